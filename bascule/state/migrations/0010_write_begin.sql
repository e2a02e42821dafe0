-- A write's first statement ([11/13]): its dataset's fence and its record locks, its plan read
-- under them, and its intent, in one round trip. VOLATILE, so that each query inside takes a
-- fresh snapshot (READ COMMITTED): the stage is read once the fence is held, and sees a change
-- committed while the write waited for it (a plain statement's snapshot would predate the lock).
--
-- The locks are session-level advisory locks: they outlive this statement's transaction, which
-- commits the intent (flushed) before the caller sends anything. Each wait is bounded by
-- p_wait_ms and all of them together by p_total_ms (lock_timeout set before each, to what is
-- left): a lock not taken in time raises lock_not_available (55P03), and the caller ends the
-- session, with whatever locks it had taken. p_request NULL: no intent (the caller's view said
-- the stage journals nothing); p_stages/p_authorities: each stage's authoritative side (the
-- policy stays in the application's code); p_traceparent: the researcher's request, for the
-- replay's span link (migration 0009).
CREATE FUNCTION bascule_write_begin(
    p_dataset text,
    p_fence bigint,
    p_whole bigint,
    p_whole_exclusive boolean,
    p_records bigint[],
    p_wait_ms int,
    p_total_ms int,
    p_record text,
    p_route text,
    p_method text,
    p_writer text,
    p_writer_started timestamptz,
    p_request bytea,
    p_journaled text[],
    p_stages text[],
    p_authorities text[],
    p_traceparent text
) RETURNS TABLE (stage text, version bigint, write_epoch bigint, seq bigint)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + make_interval(secs => p_total_ms / 1000.0);
    lock_id bigint;
    row_stage text;
    row_version bigint;
    row_epoch bigint;
    new_seq bigint;
BEGIN
    PERFORM set_config('lock_timeout', p_wait_ms || 'ms', true);
    PERFORM pg_advisory_lock_shared(p_fence);
    PERFORM bascule_lock_bound(deadline, p_wait_ms);
    IF p_whole_exclusive THEN
        PERFORM pg_advisory_lock(p_whole);
    ELSE
        PERFORM pg_advisory_lock_shared(p_whole);
    END IF;
    FOREACH lock_id IN ARRAY p_records LOOP
        PERFORM bascule_lock_bound(deadline, p_wait_ms);
        PERFORM pg_advisory_lock(lock_id);
    END LOOP;
    SELECT s.stage, s.version, s.write_epoch INTO row_stage, row_version, row_epoch
        FROM bascule_stage s WHERE s.dataset = p_dataset;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF p_request IS NOT NULL AND row_stage = ANY(p_journaled) THEN
        INSERT INTO bascule_journal (dataset, record, route, method, authority, stage_version,
            write_epoch, writer, writer_pid, writer_started, state, request, traceparent)
        VALUES (p_dataset, p_record, p_route, p_method,
            p_authorities[array_position(p_stages, row_stage)], row_version, row_epoch,
            p_writer, pg_backend_pid(), p_writer_started, 'intent', p_request, p_traceparent)
        RETURNING bascule_journal.seq INTO new_seq;
    END IF;
    RETURN QUERY SELECT row_stage, row_version, row_epoch, new_seq;
END
$$;

-- The next lock wait: p_wait_ms, or what is left before the deadline if less.
CREATE FUNCTION bascule_lock_bound(deadline timestamptz, p_wait_ms int) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    left_ms int := floor(extract(epoch FROM deadline - clock_timestamp()) * 1000);
BEGIN
    IF left_ms < 1 THEN
        RAISE EXCEPTION 'the locks of this write were not all taken in time'
            USING ERRCODE = 'lock_not_available';
    END IF;
    PERFORM set_config('lock_timeout', least(p_wait_ms, left_ms) || 'ms', true);
END
$$;
