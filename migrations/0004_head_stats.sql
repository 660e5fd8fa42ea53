-- logstore shard schema, version 4: object statistics kept exactly in the head row.
--
-- The `stats` request answers from the head row alone (no scan of the log), so the head keeps,
-- besides entries / last_seq / last_ts:
--   first_seq, first_ts: the first PRESENT entry's seq and ts, NULL while the object has no
--                        entries (none yet, or all deleted). Present entries are exactly the
--                        seqs first_seq..last_seq: appends add at the end, deletion removes a
--                        prefix (a seq bound, or a ts bound, which is a seq bound because ts
--                        never decreases along seq).
--   bytes:               sum(octet_length(log)) of the present entries.
-- Every path that adds or removes entries updates them in the same statement, under the same
-- head-row lock: the fast and careful append paths below, and deletion (a later migration).

ALTER TABLE objects
    ADD COLUMN first_seq bigint,
    ADD COLUMN first_ts  timestamptz,
    ADD COLUMN bytes     bigint NOT NULL DEFAULT 0;

-- Existing objects: one pass over the logs (this migration's cost on a shard with data).
UPDATE objects o
SET first_seq = s.first_seq, first_ts = s.first_ts, bytes = s.bytes
FROM (
    SELECT l.object_id, min(l.seq) AS first_seq, min(l.ts) AS first_ts,
           sum(octet_length(l.log)) AS bytes
    FROM logs l
    GROUP BY l.object_id
) s
WHERE o.id = s.object_id;

-- Version 1's careful path (see 0001_schema.sql for how it works), now also keeping the head's
-- statistics. Only the head creation and the `heads` update differ.
CREATE OR REPLACE FUNCTION logstore_append_careful(
    p_ids  bigint[],
    p_keys text[],
    p_logs text[],
    p_ts   timestamptz[]
) RETURNS TABLE (ord integer, seq bigint, ts timestamptz, duplicate boolean)
LANGUAGE plpgsql AS $$
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
$$;

-- Version 2's fast path (see 0002_fast_append.sql for how it works), now also keeping the
-- head's statistics. Only `per_object` and the head upsert differ. In the upsert's SET, `o.`
-- is the head as it was, so an object without present entries gets first_seq = its old
-- last_seq + 1 (the first new seq) and first_ts = the first new entry's ts.
CREATE OR REPLACE FUNCTION logstore_append(
    p_ids  bigint[],
    p_keys text[],
    p_logs text[],
    p_ts   timestamptz[]
) RETURNS TABLE (ord integer, seq bigint, ts timestamptz, duplicate boolean)
LANGUAGE plpgsql AS $$
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
$$;
