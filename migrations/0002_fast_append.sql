-- logstore shard schema, version 2: a one-pass append for the common batch.
--
-- Version 1's logstore_append touched every head row three times (create, lock, update) and
-- probed the idempotency-key index once per entry before inserting it. Under load almost no
-- batch holds a duplicate, so version 2 first tries the batch as if it held none:
--
--   1. one upsert per object, in ascending id order, creates or locks its head row and moves
--      it forward by the batch's entry count in the same step;
--   2. the entries get consecutive seqs after the head's old last_seq and ts = the running max
--      of (head's old last_ts, receipt ts), and are inserted.
--
-- If any key is already stored (or repeats inside the batch), the unique index on
-- (object_id, key) raises unique_violation during step 2; the block's subtransaction rolls
-- back everything it did (head updates included) and the batch is run again by version 1's
-- careful path, which answers duplicates with the stored seq/ts. So the invariants are exactly
-- version 1's; only the cost of a batch without duplicates changes (one head pass, no probes).

-- The head's last_ts as it was before the latest batch moved it. An upsert's RETURNING sees
-- only the new row (PostgreSQL before 18 has no RETURNING OLD), and the batch needs the old
-- last_ts to keep ts non-decreasing along seq. Only read in the statement that sets it.
ALTER TABLE objects ADD COLUMN prev_ts timestamptz;

-- Version 1's function body, kept as the path for batches that hold duplicates.
ALTER FUNCTION logstore_append(bigint[], text[], text[], timestamptz[])
    RENAME TO logstore_append_careful;

CREATE FUNCTION logstore_append(
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
        -- The results are collected into arrays, not returned row by row: RETURN QUERY would
        -- already have emitted rows when the insert (which runs last) hits a duplicate key.
        WITH input AS (
            SELECT t.ord, t.id, t.key, t.log, t.ts
            FROM unnest(p_ids, p_keys, p_logs, p_ts) WITH ORDINALITY AS t(id, key, log, ts, ord)
        ),
        per_object AS (
            SELECT i.id, count(*) AS n, max(i.ts) AS max_ts FROM input i GROUP BY i.id
        ),
        heads AS (
            INSERT INTO objects AS o (id, entries, last_seq, last_ts, prev_ts)
            SELECT p.id, p.n, p.n, p.max_ts, '-infinity' FROM per_object p ORDER BY p.id
            ON CONFLICT (id) DO UPDATE
            SET entries  = o.entries + excluded.entries,
                last_seq = o.last_seq + excluded.last_seq,
                last_ts  = greatest(o.last_ts, excluded.last_ts),
                prev_ts  = o.last_ts
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
        -- The statement (its data-modifying parts included) runs to completion before
        -- anything is assigned, so a duplicate key leaves v_seqs and v_ts unset.
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
