-- logstore shard schema, version 5: optimistic concurrency (`expected_seq`).
--
-- An append may name the seq it expects the object's last entry to have (0: no entry yet);
-- it is stored only if that holds when it is committed, else it is answered `conflict` with
-- the object's last seq, and nothing is stored. The check runs under the head-row lock, in
-- the statement that would store the entry, so no other writer can slip in between.
--
-- logstore_append gains a fifth array, p_expected (one element per entry, NULL = no
-- condition), and a `conflict` result column: for a conflicting entry `seq` is the object's
-- last seq at that moment and `ts` is NULL. A batch without any condition (nearly all) runs
-- the unchanged four-argument function (fast path, careful path on duplicates). A batch with
-- at least one condition runs logstore_append_checked, which takes the entries one at a time
-- in array order, so entries of one object are checked in array order and each sees the
-- effect of the ones before it. It costs a few statements per entry, which is why it is kept
-- to the batches that need it.
--
-- Order of checks for one entry: a key already stored answers as a duplicate with the
-- original seq/ts whatever it expected (a retry of a conditional append that was stored must
-- learn where it went, not that the object has since moved on); then the condition; then it
-- is stored.
--
-- The four-argument function stays, unchanged, for workers of the previous version during a
-- rolling upgrade.

CREATE FUNCTION logstore_append_checked(
    p_ids      bigint[],
    p_keys     text[],
    p_logs     text[],
    p_ts       timestamptz[],
    p_expected bigint[]
) RETURNS TABLE (ord integer, seq bigint, ts timestamptz, duplicate boolean, conflict boolean)
LANGUAGE plpgsql AS $$
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
$$;

CREATE FUNCTION logstore_append(
    p_ids      bigint[],
    p_keys     text[],
    p_logs     text[],
    p_ts       timestamptz[],
    p_expected bigint[]
) RETURNS TABLE (ord integer, seq bigint, ts timestamptz, duplicate boolean, conflict boolean)
LANGUAGE plpgsql AS $$
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
$$;
