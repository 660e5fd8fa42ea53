-- logstore shard schema, version 8: the fleet a shard belongs to, and the ring record it keeps
-- (docs/resharding.md, "Fleet identity" and "Repairing the ring record").
--
-- 1. The fleet. A fleet is the workers sharing one ring record (one NATS queue group); the
--    record carries a random fleet id. Each shard records the id of the fleet that uses it
--    (`shard_identity.fleet`, NULL until a worker or `worker shards add` of a fleet first
--    claims it) and a worker refuses a shard that names another fleet: two fleets that share
--    a database would raise each other's ring fences, and one of them would stop answering.
--
-- 2. The shard's copy of the ring record. Whoever raises the fence for a ring change (the
--    mover) or publishes one (`worker shards add|remove`, seeding) first keeps the record here
--    (without users or passwords, like the one in NATS), so a record in NATS that is lost or
--    overwritten with garbage can be rewritten from what the shards hold (`worker shards
--    repair`): the copy with the highest (epoch, step) is the fleet's latest ring.

ALTER TABLE shard_identity ADD COLUMN fleet text;

ALTER TABLE ring_fence
    ADD COLUMN ring_record       text,
    ADD COLUMN ring_record_epoch bigint,
    ADD COLUMN ring_record_step  smallint;

-- Record fleet p_fleet on a shard that names none yet, and return the fleet it names (p_fleet,
-- or another one: the caller then refuses the shard). SECURITY DEFINER, owned by the role that
-- migrates, so a least-privileged worker (deploy/postgres/roles.sql grants no UPDATE on
-- shard_identity) can claim a shard once and can never change a recorded fleet; the search
-- path is the one the migration ran with.
CREATE FUNCTION logstore_claim_fleet(p_fleet text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_fleet text;
BEGIN
    UPDATE shard_identity SET fleet = p_fleet WHERE fleet IS NULL;
    SELECT i.fleet INTO v_fleet FROM shard_identity i;
    RETURN v_fleet;
END;
$$;

-- Keep ring record p_record (epoch p_epoch, step p_step: 0 moving, 1 purging, 2 steady) unless
-- the copy held is later; with p_force also over a copy of the same epoch and step (the record
-- as NATS holds it wins over one an operator wrote here before losing the compare-and-set).
-- With p_raise (the mover, before it scans) the fence is raised to p_epoch in the same
-- transaction, first (logstore_fence's lock order: the advisory lock before the row).
CREATE FUNCTION logstore_keep_ring(
    p_epoch  bigint,
    p_step   smallint,
    p_record text,
    p_force  boolean,
    p_raise  boolean
) RETURNS void
LANGUAGE plpgsql AS $$
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
$$;
