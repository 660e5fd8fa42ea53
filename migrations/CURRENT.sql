-- The current schema of a logstore shard, as the migrations 0001..0008 leave it: every table,
-- index and live logstore_* function (as pg_get_functiondef prints it). For reading only: it
-- is never applied; the numbered migrations stay the source of truth (the worker embeds and
-- applies those, worker/src/store/migrate.rs).
--
-- Generated and checked: worker/tests/store.rs (current_sql_is_the_schema_the_migrations_make)
-- migrates a fresh database and fails when this file differs from it. After adding a
-- migration, regenerate it with
--     scripts/current-schema.sh
-- (or compare a live shard: psql -AtX -f scripts/current-schema.sql postgres://…/shard).
-- Older overloads of logstore_append stay for workers of earlier versions during a rolling
-- upgrade (migrations/0005_expected_seq.sql); a worker of this version calls
-- logstore_append_at.

CREATE TABLE logs (
    object_id bigint NOT NULL,
    seq bigint NOT NULL,
    ts timestamp with time zone NOT NULL,
    key text,
    log text NOT NULL,
    CONSTRAINT logs_pkey PRIMARY KEY (object_id, seq)
);

CREATE TABLE logstore_migrations (
    version integer NOT NULL,
    name text NOT NULL,
    applied_at timestamp with time zone NOT NULL DEFAULT now(),
    CONSTRAINT logstore_migrations_pkey PRIMARY KEY (version)
);

CREATE TABLE objects (
    id bigint NOT NULL,
    entries bigint NOT NULL,
    last_seq bigint NOT NULL,
    last_ts timestamp with time zone NOT NULL,
    prev_ts timestamp with time zone,
    first_seq bigint,
    first_ts timestamp with time zone,
    bytes bigint NOT NULL DEFAULT 0,
    moved_to text,
    moved_epoch bigint,
    CONSTRAINT objects_pkey PRIMARY KEY (id)
);

CREATE TABLE ring_fence (
    singleton boolean NOT NULL DEFAULT true,
    epoch bigint NOT NULL,
    ring_record text,
    ring_record_epoch bigint,
    ring_record_step smallint,
    CONSTRAINT ring_fence_pkey PRIMARY KEY (singleton),
    CONSTRAINT ring_fence_singleton_check CHECK (singleton)
);

CREATE TABLE shard_identity (
    singleton boolean NOT NULL DEFAULT true,
    name text NOT NULL,
    created_at timestamp with time zone NOT NULL DEFAULT now(),
    fleet text,
    CONSTRAINT shard_identity_pkey PRIMARY KEY (singleton),
    CONSTRAINT shard_identity_singleton_check CHECK (singleton)
);

CREATE UNIQUE INDEX logs_object_key ON public.logs USING btree (object_id, key) WHERE (key IS NOT NULL);

CREATE INDEX objects_first_ts ON public.objects USING btree (first_ts) WHERE (first_ts IS NOT NULL);

CREATE INDEX objects_moved ON public.objects USING btree (id) WHERE (moved_to IS NOT NULL);

CREATE OR REPLACE FUNCTION public.logstore_append(p_ids bigint[], p_keys text[], p_logs text[], p_ts timestamp with time zone[])
 RETURNS TABLE(ord integer, seq bigint, ts timestamp with time zone, duplicate boolean)
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_seqs bigint[];
    v_ts   timestamptz[];
BEGIN
    BEGIN
        WITH input AS (
            SELECT t.ord, t.id, t.key, t.log, t.ts
            FROM unnest(p_ids, p_keys, p_logs, p_ts) WITH ORDINALITY AS t(id, key, log, ts, ord)
        ),
        per_object AS (
            SELECT i.id, count(*) AS n, max(i.ts) AS max_ts,
                   (array_agg(i.ts ORDER BY i.ord))[1] AS first_in,
                   sum(octet_length(i.log)) AS bytes
            FROM input i GROUP BY i.id
        ),
        heads AS (
            INSERT INTO objects AS o (id, entries, last_seq, last_ts, prev_ts,
                                      first_seq, first_ts, bytes)
            SELECT p.id, p.n, p.n, p.max_ts, '-infinity', 1, p.first_in, p.bytes
            FROM per_object p ORDER BY p.id
            ON CONFLICT (id) DO UPDATE
            SET entries   = o.entries + excluded.entries,
                last_seq  = o.last_seq + excluded.last_seq,
                last_ts   = greatest(o.last_ts, excluded.last_ts),
                prev_ts   = o.last_ts,
                first_seq = coalesce(o.first_seq, o.last_seq + 1),
                first_ts  = coalesce(o.first_ts, greatest(o.last_ts, excluded.first_ts)),
                bytes     = o.bytes + excluded.bytes
            RETURNING o.id, o.last_seq, o.prev_ts
        ),
        numbered AS (
            SELECT i.ord, i.id, i.key, i.log,
                   h.last_seq - p.n + row_number() OVER w AS seq,
                   greatest(h.prev_ts, max(i.ts) OVER w) AS ts
            FROM input i
            JOIN per_object p ON p.id = i.id
            JOIN heads h ON h.id = i.id
            WINDOW w AS (PARTITION BY i.id ORDER BY i.ord ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
        ),
        inserted AS (
            INSERT INTO logs (object_id, seq, ts, key, log)
            SELECT n.id, n.seq, n.ts, n.key, n.log FROM numbered n
        )
        SELECT array_agg(n.seq ORDER BY n.ord), array_agg(n.ts ORDER BY n.ord)
        INTO v_seqs, v_ts
        FROM numbered n;
    EXCEPTION WHEN unique_violation THEN
        RETURN QUERY SELECT * FROM logstore_append_careful(p_ids, p_keys, p_logs, p_ts);
        RETURN;
    END;
    RETURN QUERY
    SELECT r.ord::integer, r.seq, r.ts, false
    FROM unnest(v_seqs, v_ts) WITH ORDINALITY AS r(seq, ts, ord);
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_append(p_ids bigint[], p_keys text[], p_logs text[], p_ts timestamp with time zone[], p_expected bigint[])
 RETURNS TABLE(ord integer, seq bigint, ts timestamp with time zone, duplicate boolean, conflict boolean)
 LANGUAGE plpgsql
AS $function$
BEGIN
    IF p_expected IS NULL OR NOT EXISTS (
        SELECT 1 FROM unnest(p_expected) AS e(expected) WHERE e.expected IS NOT NULL
    ) THEN
        RETURN QUERY
        SELECT a.ord, a.seq, a.ts, a.duplicate, false
        FROM logstore_append(p_ids, p_keys, p_logs, p_ts) AS a;
    ELSE
        RETURN QUERY
        SELECT * FROM logstore_append_checked(p_ids, p_keys, p_logs, p_ts, p_expected);
    END IF;
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_append_at(p_epoch bigint, p_moving bigint[], p_ids bigint[], p_keys text[], p_logs text[], p_ts timestamp with time zone[], p_expected bigint[])
 RETURNS TABLE(ord integer, seq bigint, ts timestamp with time zone, duplicate boolean, conflict boolean, moved boolean)
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_here bigint[];
    v_keep integer[];
BEGIN
    PERFORM logstore_fence(p_epoch);
    IF p_moving IS NULL OR cardinality(p_moving) = 0 THEN
        RETURN QUERY
        SELECT a.ord, a.seq, a.ts, a.duplicate, a.conflict, false
        FROM logstore_append(p_ids, p_keys, p_logs, p_ts, p_expected) AS a;
        RETURN;
    END IF;
    -- The moving objects that live here, locked in id order (as every append locks). A head
    -- row the mover holds is waited for; once the mover commits, the row is re-checked and,
    -- now a tombstone, left out.
    SELECT coalesce(array_agg(h.id), '{}') INTO v_here
    FROM (
        SELECT o.id FROM objects o
        WHERE o.id = ANY (p_moving) AND o.moved_to IS NULL
        ORDER BY o.id
        FOR UPDATE
    ) h;
    SELECT coalesce(array_agg(i ORDER BY i), '{}') INTO v_keep
    FROM generate_subscripts(p_ids, 1) AS i
    WHERE NOT (p_ids[i] = ANY (p_moving)) OR p_ids[i] = ANY (v_here);
    IF cardinality(v_keep) > 0 THEN
        RETURN QUERY
        SELECT v_keep[a.ord], a.seq, a.ts, a.duplicate, a.conflict, false
        FROM logstore_append(
            ARRAY(SELECT p_ids[k] FROM unnest(v_keep) WITH ORDINALITY u(k, n) ORDER BY n),
            ARRAY(SELECT p_keys[k] FROM unnest(v_keep) WITH ORDINALITY u(k, n) ORDER BY n),
            ARRAY(SELECT p_logs[k] FROM unnest(v_keep) WITH ORDINALITY u(k, n) ORDER BY n),
            ARRAY(SELECT p_ts[k] FROM unnest(v_keep) WITH ORDINALITY u(k, n) ORDER BY n),
            CASE WHEN p_expected IS NULL THEN NULL ELSE
                ARRAY(SELECT p_expected[k] FROM unnest(v_keep) WITH ORDINALITY u(k, n) ORDER BY n)
            END
        ) AS a;
    END IF;
    RETURN QUERY
    SELECT i, NULL::bigint, NULL::timestamptz, false, false, true
    FROM generate_subscripts(p_ids, 1) AS i
    WHERE NOT (i = ANY (v_keep));
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_append_careful(p_ids bigint[], p_keys text[], p_logs text[], p_ts timestamp with time zone[])
 RETURNS TABLE(ord integer, seq bigint, ts timestamp with time zone, duplicate boolean)
 LANGUAGE plpgsql
AS $function$
BEGIN
    INSERT INTO objects (id, entries, last_seq, last_ts)
    SELECT DISTINCT u.id, 0, 0, '-infinity'::timestamptz
    FROM unnest(p_ids) AS u(id)
    ORDER BY u.id
    ON CONFLICT (id) DO NOTHING;

    PERFORM 1 FROM objects o WHERE o.id = ANY (p_ids) ORDER BY o.id FOR UPDATE;

    RETURN QUERY
    WITH input AS (
        SELECT t.ord::integer AS ord, t.id, t.key, t.log, t.ts
        FROM unnest(p_ids, p_keys, p_logs, p_ts) WITH ORDINALITY AS t(id, key, log, ts, ord)
    ),
    existing AS (
        SELECT i.ord, e.seq, e.ts
        FROM input i JOIN logs e ON e.object_id = i.id AND e.key = i.key
    ),
    candidates AS (
        SELECT i.*, (i.key IS NULL OR i.ord = min(i.ord) OVER (PARTITION BY i.id, i.key)) AS first
        FROM input i
        WHERE NOT EXISTS (SELECT 1 FROM existing x WHERE x.ord = i.ord)
    ),
    fresh AS (
        SELECT c.ord, c.id, c.key, c.log,
               o.last_seq + row_number() OVER w AS seq,
               greatest(o.last_ts, max(c.ts) OVER w) AS ts
        FROM candidates c JOIN objects o ON o.id = c.id
        WHERE c.first
        WINDOW w AS (PARTITION BY c.id ORDER BY c.ord ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)
    ),
    inserted AS (
        INSERT INTO logs (object_id, seq, ts, key, log)
        SELECT f.id, f.seq, f.ts, f.key, f.log FROM fresh f
    ),
    heads AS (
        UPDATE objects o
        SET entries   = o.entries + h.n,
            last_seq  = h.seq,
            last_ts   = h.ts,
            -- ts never decreases along seq, so the smallest new ts is the first new entry's.
            first_seq = coalesce(o.first_seq, h.first_seq),
            first_ts  = coalesce(o.first_ts, h.first_ts),
            bytes     = o.bytes + h.bytes
        FROM (SELECT f.id, count(*) AS n, max(f.seq) AS seq, max(f.ts) AS ts,
                     min(f.seq) AS first_seq, min(f.ts) AS first_ts,
                     sum(octet_length(f.log)) AS bytes
              FROM fresh f GROUP BY f.id) h
        WHERE o.id = h.id
    )
    SELECT i.ord,
           coalesce(x.seq, f.seq, d.seq),
           coalesce(x.ts, f.ts, d.ts),
           f.ord IS NULL
    FROM input i
    LEFT JOIN existing x ON x.ord = i.ord
    LEFT JOIN fresh f ON f.ord = i.ord
    LEFT JOIN fresh d ON x.ord IS NULL AND f.ord IS NULL AND d.id = i.id AND d.key = i.key
    ORDER BY i.ord;
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_append_checked(p_ids bigint[], p_keys text[], p_logs text[], p_ts timestamp with time zone[], p_expected bigint[])
 RETURNS TABLE(ord integer, seq bigint, ts timestamp with time zone, duplicate boolean, conflict boolean)
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_id      bigint;
    v_last    bigint;
    v_last_ts timestamptz;
    v_seq     bigint;
    v_ts      timestamptz;
BEGIN
    -- Heads are created and locked in ascending id order, as in the careful path: no
    -- deadlocks with other batches, and no other writer for these objects until commit.
    INSERT INTO objects (id, entries, last_seq, last_ts)
    SELECT DISTINCT u.id, 0, 0, '-infinity'::timestamptz
    FROM unnest(p_ids) AS u(id)
    ORDER BY u.id
    ON CONFLICT (id) DO NOTHING;

    PERFORM 1 FROM objects o WHERE o.id = ANY (p_ids) ORDER BY o.id FOR UPDATE;

    FOR i IN 1 .. coalesce(array_length(p_ids, 1), 0) LOOP
        v_id := p_ids[i];
        ord := i;
        duplicate := false;
        conflict := false;
        IF p_keys[i] IS NOT NULL THEN
            SELECT l.seq, l.ts INTO v_seq, v_ts
            FROM logs l
            WHERE l.object_id = v_id AND l.key = p_keys[i];
            IF FOUND THEN
                seq := v_seq;
                ts := v_ts;
                duplicate := true;
                RETURN NEXT;
                CONTINUE;
            END IF;
        END IF;
        SELECT o.last_seq, o.last_ts INTO v_last, v_last_ts FROM objects o WHERE o.id = v_id;
        IF p_expected[i] IS NOT NULL AND p_expected[i] <> v_last THEN
            seq := v_last;
            ts := NULL;
            conflict := true;
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_seq := v_last + 1;
        v_ts := greatest(v_last_ts, p_ts[i]);
        INSERT INTO logs (object_id, seq, ts, key, log)
        VALUES (v_id, v_seq, v_ts, p_keys[i], p_logs[i]);
        UPDATE objects o
        SET entries   = o.entries + 1,
            last_seq  = v_seq,
            last_ts   = v_ts,
            first_seq = coalesce(o.first_seq, v_seq),
            first_ts  = coalesce(o.first_ts, v_ts),
            bytes     = o.bytes + octet_length(p_logs[i])
        WHERE o.id = v_id;
        seq := v_seq;
        ts := v_ts;
        RETURN NEXT;
    END LOOP;
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_claim_fleet(p_fleet text)
 RETURNS text
 LANGUAGE plpgsql
 SECURITY DEFINER
 SET search_path TO '$user', 'public'
AS $function$
DECLARE
    v_fleet text;
BEGIN
    UPDATE shard_identity SET fleet = p_fleet WHERE fleet IS NULL;
    SELECT i.fleet INTO v_fleet FROM shard_identity i;
    RETURN v_fleet;
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_delete(p_id bigint, p_before bigint, p_limit integer, p_skip_locked boolean)
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_first    bigint;
    v_last     bigint;
    v_upto     bigint;
    v_deleted  bigint;
    v_bytes    bigint;
    v_next_seq bigint;
    v_next_ts  timestamptz;
BEGIN
    IF p_skip_locked THEN
        SELECT o.first_seq, o.last_seq INTO v_first, v_last
        FROM objects o WHERE o.id = p_id
        FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    ELSE
        SELECT o.first_seq, o.last_seq INTO v_first, v_last
        FROM objects o WHERE o.id = p_id
        FOR UPDATE;
        IF NOT FOUND THEN
            RETURN 0;
        END IF;
    END IF;
    IF v_first IS NULL THEN
        RETURN 0; -- no entries present
    END IF;
    -- Entries v_first .. v_upto - 1 go.
    v_upto := least(coalesce(p_before, v_last + 1), v_last + 1, v_first + p_limit);
    IF v_upto <= v_first THEN
        RETURN 0;
    END IF;
    WITH gone AS (
        DELETE FROM logs l
        WHERE l.object_id = p_id AND l.seq >= v_first AND l.seq < v_upto
        RETURNING octet_length(l.log) AS bytes
    )
    SELECT count(*), coalesce(sum(g.bytes), 0) INTO v_deleted, v_bytes FROM gone g;
    -- The new first entry (none: both stay NULL, the object is empty).
    SELECT l.seq, l.ts INTO v_next_seq, v_next_ts
    FROM logs l
    WHERE l.object_id = p_id AND l.seq >= v_upto
    ORDER BY l.seq
    LIMIT 1;
    UPDATE objects o
    SET entries   = o.entries - v_deleted,
        bytes     = o.bytes - v_bytes,
        first_seq = v_next_seq,
        first_ts  = v_next_ts
    WHERE o.id = p_id;
    RETURN v_deleted;
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_delete_at(p_epoch bigint, p_id bigint, p_before bigint, p_limit integer, p_skip_locked boolean)
 RETURNS bigint
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_moved text;
BEGIN
    IF p_epoch IS NOT NULL THEN
        PERFORM logstore_fence(p_epoch);
    END IF;
    IF p_skip_locked THEN
        SELECT o.moved_to INTO v_moved FROM objects o WHERE o.id = p_id FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
    ELSE
        SELECT o.moved_to INTO v_moved FROM objects o WHERE o.id = p_id FOR UPDATE;
    END IF;
    IF v_moved IS NOT NULL THEN
        RETURN -1;
    END IF;
    RETURN logstore_delete(p_id, p_before, p_limit, p_skip_locked);
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_fence(p_epoch bigint)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
DECLARE
    v_fence bigint;
BEGIN
    SELECT f.epoch INTO v_fence FROM ring_fence f;
    IF p_epoch > v_fence THEN
        PERFORM pg_advisory_xact_lock(7464916250018);
        UPDATE ring_fence SET epoch = p_epoch WHERE epoch < p_epoch;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(7464916250018);
    SELECT f.epoch INTO v_fence FROM ring_fence f;
    IF p_epoch < v_fence THEN
        RAISE EXCEPTION 'stale ring epoch %: this shard is fenced at epoch %', p_epoch, v_fence
            USING ERRCODE = 'LS001', DETAIL = v_fence::text;
    END IF;
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_keep_ring(p_epoch bigint, p_step smallint, p_record text, p_force boolean, p_raise boolean)
 RETURNS void
 LANGUAGE plpgsql
AS $function$
BEGIN
    IF p_raise THEN
        PERFORM logstore_fence(p_epoch);
    END IF;
    UPDATE ring_fence
    SET ring_record = p_record, ring_record_epoch = p_epoch, ring_record_step = p_step
    WHERE ring_record IS NULL
       OR (ring_record_epoch, ring_record_step) < (p_epoch, p_step)
       OR (p_force AND (ring_record_epoch, ring_record_step) = (p_epoch, p_step));
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_ring_fence()
 RETURNS bigint
 LANGUAGE plpgsql
 STABLE
AS $function$
BEGIN
    RETURN (SELECT f.epoch FROM ring_fence f);
END;
$function$;

CREATE OR REPLACE FUNCTION public.logstore_seq_at(p_id bigint, p_ts timestamp with time zone)
 RETURNS bigint
 LANGUAGE plpgsql
 STABLE STRICT
AS $function$
DECLARE
    v_lo  bigint := 1;
    v_hi  bigint;
    v_mid bigint;
    v_seq bigint;
    v_ts  timestamptz;
BEGIN
    SELECT o.last_seq + 1 INTO v_hi FROM objects o WHERE o.id = p_id;
    IF v_hi IS NULL THEN
        RETURN 1;
    END IF;
    -- Invariant: entries with seq < v_lo have ts < p_ts; entries with seq >= v_hi have
    -- ts >= p_ts (or do not exist).
    WHILE v_lo < v_hi LOOP
        v_mid := v_lo + (v_hi - v_lo) / 2;
        SELECT l.seq, l.ts INTO v_seq, v_ts
        FROM logs l
        WHERE l.object_id = p_id AND l.seq >= v_mid
        ORDER BY l.seq
        LIMIT 1;
        IF NOT FOUND OR v_ts >= p_ts THEN
            v_hi := v_mid;
        ELSE
            v_lo := least(v_seq + 1, v_hi);
        END IF;
    END LOOP;
    RETURN v_lo;
END;
$function$;
