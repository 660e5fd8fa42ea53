-- logstore shard schema, version 6: deletion (the `delete` request and the retention sweeper).
--
-- Deletion always removes a PREFIX of an object's log: the entries below a seq. A `delete`
-- request names that seq; retention turns "older than the cutoff" into one with
-- logstore_seq_at (ts never decreases along seq). So the present entries stay exactly
-- first_seq..last_seq, and the head keeps last_seq: seqs are never reused, the next append
-- continues after the last one ever assigned.
--
-- Every call removes at most p_limit entries in its own short transaction, holding the head
-- row's lock only for that long: a big deletion is many small ones, never one long lock that
-- appends to the object would queue behind.

-- Delete up to p_limit of object p_id's oldest entries with seq < p_before (NULL: all) and
-- keep its head exact (entries, bytes, first_seq, first_ts). Returns the number deleted, or
-- NULL when p_skip_locked is set and the head row is locked by someone else (an append in
-- progress: the sweeper comes back later instead of waiting) or does not exist.
CREATE FUNCTION logstore_delete(
    p_id          bigint,
    p_before      bigint,
    p_limit       integer,
    p_skip_locked boolean
) RETURNS bigint
LANGUAGE plpgsql AS $$
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
$$;

-- The sweeper finds the objects holding expired entries by their first entry's ts. Appends
-- leave first_ts unchanged (it is only set when an object gets its first present entry), so
-- their head updates stay HOT; objects without entries are left out.
CREATE INDEX objects_first_ts ON objects (first_ts) WHERE first_ts IS NOT NULL;
