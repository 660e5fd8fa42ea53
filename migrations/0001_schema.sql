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
-- 1. Head rows are created and then locked in ascending id order, so two batches sharing
--    objects always take their locks in the same order and cannot deadlock.
-- 2. Under those locks (each statement below takes a fresh snapshot, so it sees what the
--    previous lock holder committed): keys already stored answer with the stored seq/ts; a key
--    repeated inside the batch is stored once, its first occurrence; the rest get consecutive
--    seqs after the head's last seq, and ts = the running max of (head's last ts, receipt ts),
--    so ts never decreases along seq.
-- 3. The inserts and head updates run as data-modifying CTEs of the same statement.
CREATE FUNCTION logstore_append(
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
        SET entries = o.entries + h.n, last_seq = h.seq, last_ts = h.ts
        FROM (SELECT f.id, count(*) AS n, max(f.seq) AS seq, max(f.ts) AS ts FROM fresh f GROUP BY f.id) h
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
