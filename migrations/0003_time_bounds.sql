-- logstore shard schema, version 3: time bounds resolved to seq bounds.
--
-- Per object, ts never decreases along seq, so "entries with ts >= T" is "entries with
-- seq >= S" for one S. logstore_seq_at finds S by binary search over seq, each probe one
-- primary-key lookup (at most ~63, about 24 for 10 million entries), and a query bounded by
-- time then reads its page with one range scan of the primary key (object_id, seq). No index
-- on ts is needed, so appends pay nothing for time-range reads.

-- The lowest seq from which every entry of object p_id has ts >= p_ts: entries below it have
-- ts < p_ts. It is last_seq + 1 when every entry is older, 1 for an unknown object. So
-- `since` (inclusive) is "seq >= logstore_seq_at(id, since)" and `until` (exclusive) is
-- "seq < logstore_seq_at(id, until)".
--
-- STABLE: it runs in its caller's snapshot, so the bound agrees with the head row and the
-- page read by the same statement. STRICT: a NULL time gives NULL (no bound), which
-- greatest()/least() in the caller ignore. Entries below the first present seq may have been
-- deleted, so a probe takes the first entry AT OR AFTER its midpoint.
CREATE FUNCTION logstore_seq_at(p_id bigint, p_ts timestamptz) RETURNS bigint
LANGUAGE plpgsql STABLE STRICT AS $$
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
$$;
