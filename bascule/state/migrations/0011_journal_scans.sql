-- The journal is a queue ([11/13]): each write inserts its intent, then moves it to pending and
-- to applied, and each move is a new row version with new entries in the open-entry indexes
-- (their predicates name the state, so no move is a HOT update). A bitmap scan of those
-- indexes reads every entry still there, and its heap page, until VACUUM removes the dead
-- ones. A plain index scan marks the entries it finds dead to everyone (LP_DEAD), skips them
-- from then on, and Postgres drops them when their page would split: the index stays the size
-- of what is open. Without statistics (a new journal; ANALYZE comes with autovacuum) the
-- planner chose bitmap scans for the replayer's wave and the resolver's look, every half
-- second, and each read every write since the last VACUUM: 27,866 index entries and 2,420
-- heap pages for an empty wave 17,000 writes in, 112,000 entries a wave at 126,000 writes,
-- the state Postgres's CPU per write growing with them (docs/decisions.md). These functions
-- read the open entries by index scan, whatever the statistics and whether autovacuum runs.
--
-- One function per set of states a reader wants (open; intent or in doubt), each with its
-- states spelled as a literal that proves a partial index's predicate (a parameter would not,
-- and no partial index could be used): for every reader that comes back periodically, the
-- replayer, the resolver, the gauges, the gate. Without statistics the open entries come by
-- bascule_journal_open_by_time, the unsettled ones by bascule_journal_unsettled. The bodies
-- and answers are not returned: callers read them by seq when they need them.
CREATE FUNCTION bascule_journal_open(p_dataset text)
RETURNS TABLE (seq bigint, dataset text, record text, route text, method text, state text,
               next_attempt_at timestamptz, created_at timestamptz)
LANGUAGE plpgsql STABLE
SET enable_bitmapscan = off SET enable_seqscan = off
AS $$
BEGIN
    IF p_dataset IS NULL THEN  -- every dataset's (the backlog gauges)
        RETURN QUERY SELECT j.seq, j.dataset, j.record, j.route, j.method, j.state,
                j.next_attempt_at, j.created_at
            FROM bascule_journal j
            WHERE j.state IN ('intent', 'pending', 'in_doubt', 'dead');
    ELSE
        RETURN QUERY SELECT j.seq, j.dataset, j.record, j.route, j.method, j.state,
                j.next_attempt_at, j.created_at
            FROM bascule_journal j
            WHERE j.dataset = p_dataset AND j.state IN ('intent', 'pending', 'in_doubt', 'dead');
    END IF;
END
$$;

-- The entries at intent or in doubt of a dataset, with what tells an orphan (the resolver's
-- look, the gate's and the switch's orphan counts).
CREATE FUNCTION bascule_journal_unsettled(p_dataset text)
RETURNS TABLE (seq bigint, dataset text, record text, route text, method text,
               authority text, stage_version bigint, state text, status int, attempts int,
               created_at timestamptz, last_error text, traceparent text, writer_pid int,
               writer_started timestamptz)
LANGUAGE plpgsql STABLE
SET enable_bitmapscan = off SET enable_seqscan = off
AS $$
BEGIN
    IF p_dataset IS NULL THEN  -- not "every dataset": no reader needs it
        RAISE EXCEPTION 'bascule_journal_unsettled: a dataset is needed'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    RETURN QUERY SELECT j.seq, j.dataset, j.record, j.route, j.method, j.authority,
            j.stage_version, j.state, j.status, j.attempts, j.created_at, j.last_error,
            j.traceparent, j.writer_pid, j.writer_started
        FROM bascule_journal j
        WHERE j.dataset = p_dataset AND j.state IN ('intent', 'in_doubt');
END
$$;

-- Where autovacuum runs, it vacuums and analyzes the journal every 10,000 changed rows (about
-- 3,300 writes) instead of at 20% of a table that holds a retention period of writes.
ALTER TABLE bascule_journal SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 10000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 10000
);
