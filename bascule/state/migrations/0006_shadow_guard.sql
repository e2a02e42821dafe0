-- Shadow reads ([5/10]): what the race guard probes, and the errored comparisons the gate
-- counts. A guard is a few EXISTS probes; these keep each one an index range, however large
-- a backlog grows (a generic plan over every open entry took 60-560 ms on 200k entries).
CREATE INDEX bascule_journal_open_by_time ON bascule_journal (dataset, authority, decided_at)
    WHERE state IN ('intent', 'pending', 'in_doubt', 'dead');
CREATE INDEX bascule_journal_unsettled ON bascule_journal (dataset)
    WHERE state IN ('intent', 'in_doubt');
CREATE INDEX bascule_journal_settled_by_dataset ON bascule_journal (dataset, applied_at)
    WHERE state IN ('applied', 'skipped');

-- Comparisons that could not be made (the shadowed side failed or timed out, its answer was
-- too large, the guard could not read the journal), per minute: like mismatches, the gate's
-- evidence must survive a Redis restart. A reason is a class, never a value.
CREATE TABLE bascule_shadow_error (
    dataset  text NOT NULL,
    route    text NOT NULL,
    reason   text NOT NULL,
    minute   timestamptz NOT NULL,
    n        bigint NOT NULL,
    PRIMARY KEY (dataset, minute, route, reason)
);
