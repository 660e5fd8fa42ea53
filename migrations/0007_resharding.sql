-- logstore shard schema, version 7: moving objects between shards online (docs/resharding.md).
--
-- Three things:
--
-- 1. The epoch fence. Ring membership lives in NATS with an epoch that grows by one with every
--    `worker shards add/remove`. Every append and read names the epoch its worker routes by.
--    The shard keeps the highest epoch it has seen (`ring_fence`): a request with a lower one
--    fails with SQLSTATE LS001 (`stale ring epoch`), and the worker re-reads the ring and
--    routes again. So once any request of epoch N (or the mover) reached this shard, no worker
--    still routing by N-1 can create an object here that ring N places elsewhere.
--    Appends read the fence under a SHARED advisory lock held to their commit; raising it
--    takes the lock EXCLUSIVELY, so no append that passed the old fence is still uncommitted
--    once the raise has happened (the mover's scan, which comes after, sees all of them).
--
-- 2. Tombstones. `objects.moved_to` names the shard an object moved to (NULL: it lives here).
--    The mover sets it in the transaction that holds the head row's lock while the entries
--    are copied to the new owner, so an append waiting on that lock sees the marker and goes
--    to the new owner. The old copy's entries are purged later (after every query that might
--    have begun reading them has ended); the head row stays as a tombstone.
--
-- 3. logstore_append_at: the append of a worker that knows the ring. `p_moving` lists the ids
--    of the batch whose owner changes in the move now running (the worker sends them to their
--    old owner, this shard). Such an entry is stored here only if its object lives here (head
--    row without marker, locked for the rest of the transaction); otherwise (moved, or never
--    here) it is answered `moved`, nothing is stored, and the worker sends it to the new owner.

CREATE TABLE ring_fence (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch     bigint NOT NULL
);
INSERT INTO ring_fence (epoch) VALUES (0);

ALTER TABLE objects
    ADD COLUMN moved_to    text,
    ADD COLUMN moved_epoch bigint;

-- The fence, for reads (which compare it with their epoch themselves). STABLE: it reads the
-- snapshot of the statement that calls it, so a read's marker and fence agree.
CREATE FUNCTION logstore_ring_fence() RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN (SELECT f.epoch FROM ring_fence f);
END;
$$;

-- Check (or raise) the fence for a request of epoch p_epoch; see 1. above.
CREATE FUNCTION logstore_fence(p_epoch bigint) RETURNS void
LANGUAGE plpgsql AS $$
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
$$;

CREATE FUNCTION logstore_append_at(
    p_epoch    bigint,
    p_moving   bigint[],
    p_ids      bigint[],
    p_keys     text[],
    p_logs     text[],
    p_ts       timestamptz[],
    p_expected bigint[]
) RETURNS TABLE (ord integer, seq bigint, ts timestamptz, duplicate boolean, conflict boolean,
                 moved boolean)
LANGUAGE plpgsql AS $$
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
$$;

-- Deletion that respects tombstones: -1 when the object moved away (the worker deletes on its
-- new owner instead), else as logstore_delete. p_epoch NULL: no fence (the retention sweeper,
-- which only ever deletes objects that live on this shard).
CREATE FUNCTION logstore_delete_at(
    p_epoch       bigint,
    p_id          bigint,
    p_before      bigint,
    p_limit       integer,
    p_skip_locked boolean
) RETURNS bigint
LANGUAGE plpgsql AS $$
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
$$;

-- The purge and the mover's scans look for tombstones and live objects.
CREATE INDEX objects_moved ON objects (id) WHERE moved_to IS NOT NULL;
