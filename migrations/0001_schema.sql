-- logstore shard schema, version 1.
--
-- Object ids are u64 on the wire and bigint here by bit-reinterpretation (id as i64), so the
-- whole u64 range fits. Per object, seq runs 1, 2, 3, … without gaps in commit order, and ts
-- never decreases along seq, so "sorted by timestamp" is "sorted by seq".

-- Which shard this database is. Written once on first start; a worker whose configuration maps
-- another name to this database refuses to start instead of writing objects to the wrong place.
CREATE TABLE shard_identity (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    name       text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One head row per object: the exact entry count and the last seq/ts. Its row lock is what
-- serialises concurrent writers of one object.
CREATE TABLE objects (
    id       bigint PRIMARY KEY,
    entries  bigint NOT NULL,
    last_seq bigint NOT NULL,
    last_ts  timestamptz NOT NULL
);

CREATE TABLE logs (
    object_id bigint NOT NULL,
    seq       bigint NOT NULL,
    ts        timestamptz NOT NULL,
    key       text,
    log       text NOT NULL,
    PRIMARY KEY (object_id, seq)
);

-- The idempotency guarantee: one key, one entry per object.
CREATE UNIQUE INDEX logs_object_key ON logs (object_id, key) WHERE key IS NOT NULL;

-- Append a batch in one round trip. The arrays are parallel, one element per append, in the
-- order the worker received them. Returns one row per input element (ord is its 1-based index):
-- the entry's seq and ts, and whether it was a duplicate (then seq/ts are the original's).
--
-- Locking: head rows are created and then locked in ascending id order, so two batches sharing
-- objects always take their locks in the same order and cannot deadlock.
CREATE FUNCTION logstore_append(
    p_ids  bigint[],
    p_keys text[],
    p_logs text[],
    p_ts   timestamptz[]
) RETURNS TABLE (ord integer, seq bigint, ts timestamptz, duplicate boolean)
LANGUAGE plpgsql AS $$
DECLARE
    r          record;
    cur_id     bigint;
    cur_seq    bigint;
    cur_ts     timestamptz;
    cur_added  bigint := 0;
    res_seq    bigint[] := '{}';
    res_ts     timestamptz[] := '{}';
    res_dup    boolean[] := '{}';
    ins_ids    bigint[] := '{}';
    ins_seqs   bigint[] := '{}';
    ins_ts     timestamptz[] := '{}';
    ins_keys   text[] := '{}';
    ins_logs   text[] := '{}';
    head_ids   bigint[] := '{}';
    head_seqs  bigint[] := '{}';
    head_ts    timestamptz[] := '{}';
    head_added bigint[] := '{}';
BEGIN
    INSERT INTO objects (id, entries, last_seq, last_ts)
    SELECT DISTINCT u.id, 0, 0, '-infinity'::timestamptz
    FROM unnest(p_ids) AS u(id)
    ORDER BY u.id
    ON CONFLICT (id) DO NOTHING;

    PERFORM 1 FROM objects o WHERE o.id = ANY (p_ids) ORDER BY o.id FOR UPDATE;

    -- Under the locks: walk the batch per object in arrival order. Keys already stored (e.locator)
    -- or seen earlier in this batch (first_ord < ord) are answered with the original's seq/ts.
    FOR r IN
        SELECT t.ord::integer AS ord, t.id, t.key, t.log, t.ts,
               e.seq AS e_seq, e.ts AS e_ts,
               CASE WHEN t.key IS NULL THEN t.ord
                    ELSE min(t.ord) OVER (PARTITION BY t.id, t.key) END AS first_ord
        FROM unnest(p_ids, p_keys, p_logs, p_ts) WITH ORDINALITY AS t(id, key, log, ts, ord)
        LEFT JOIN logs e ON e.object_id = t.id AND e.key = t.key
        ORDER BY t.id, t.ord
    LOOP
        IF cur_id IS DISTINCT FROM r.id THEN
            IF cur_id IS NOT NULL AND cur_added > 0 THEN
                head_ids := head_ids || cur_id;
                head_seqs := head_seqs || cur_seq;
                head_ts := head_ts || cur_ts;
                head_added := head_added || cur_added;
            END IF;
            SELECT o.last_seq, o.last_ts INTO cur_seq, cur_ts FROM objects o WHERE o.id = r.id;
            cur_id := r.id;
            cur_added := 0;
        END IF;

        IF r.e_seq IS NOT NULL THEN
            res_seq[r.ord] := r.e_seq;
            res_ts[r.ord] := r.e_ts;
            res_dup[r.ord] := true;
        ELSIF r.first_ord < r.ord THEN
            res_seq[r.ord] := res_seq[r.first_ord];
            res_ts[r.ord] := res_ts[r.first_ord];
            res_dup[r.ord] := true;
        ELSE
            cur_seq := cur_seq + 1;
            cur_ts := greatest(cur_ts, r.ts);
            cur_added := cur_added + 1;
            res_seq[r.ord] := cur_seq;
            res_ts[r.ord] := cur_ts;
            res_dup[r.ord] := false;
            ins_ids := ins_ids || r.id;
            ins_seqs := ins_seqs || cur_seq;
            ins_ts := ins_ts || cur_ts;
            ins_keys := ins_keys || r.key;
            ins_logs := ins_logs || r.log;
        END IF;
    END LOOP;
    IF cur_id IS NOT NULL AND cur_added > 0 THEN
        head_ids := head_ids || cur_id;
        head_seqs := head_seqs || cur_seq;
        head_ts := head_ts || cur_ts;
        head_added := head_added || cur_added;
    END IF;

    INSERT INTO logs (object_id, seq, ts, key, log)
    SELECT * FROM unnest(ins_ids, ins_seqs, ins_ts, ins_keys, ins_logs);

    UPDATE objects o
    SET entries = o.entries + h.added, last_seq = h.seq, last_ts = h.ts
    FROM unnest(head_ids, head_seqs, head_ts, head_added) AS h(id, seq, ts, added)
    WHERE o.id = h.id;

    RETURN QUERY
    SELECT i, res_seq[i], res_ts[i], res_dup[i]
    FROM generate_subscripts(p_ids, 1) AS i
    ORDER BY i;
END;
$$;
