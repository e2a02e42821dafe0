-- The dual-write journal: one row per write accepted in a dual-write stage. Each row carries its
-- own state; the replayer never relies on a high-water mark (a lower seq can commit after a
-- higher one is visible). Bodies are sealed (AES-GCM) by the application: health data.
CREATE TABLE bascule_journal (
    seq              bigserial PRIMARY KEY,
    dataset          text NOT NULL,
    record           text NOT NULL,   -- keyed token of the record, or '*' for a dataset-wide write
    route            text NOT NULL,   -- the route template: never a concrete path
    method           text NOT NULL,
    authority        text NOT NULL CHECK (authority IN ('source', 'target')),
    stage_version    bigint NOT NULL,
    writer           text NOT NULL,   -- the replica that accepted it
    writer_pid       int NOT NULL,    -- the state-database session holding its record lock
    writer_started   timestamptz NOT NULL,
    state            text NOT NULL CHECK (state IN
                         ('intent', 'pending', 'applied', 'rejected', 'in_doubt', 'dead', 'skipped')),
    request          bytea NOT NULL,  -- sealed: method, target, headers (never Authorization), body
    answer           bytea,           -- sealed: the authoritative side's answer
    status           int,             -- the authoritative side's status code
    attempts         int NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,            -- an error class or status, never a value
    created_at       timestamptz NOT NULL DEFAULT now(),
    decided_at       timestamptz,
    applied_at       timestamptz
);

-- Open entries (not yet settled) by record, in order: what the replayer and the gate look at.
CREATE INDEX bascule_journal_open ON bascule_journal (dataset, record, seq)
    WHERE state IN ('intent', 'pending', 'in_doubt', 'dead');
CREATE INDEX bascule_journal_settled ON bascule_journal (applied_at)
    WHERE state IN ('applied', 'rejected', 'skipped');

-- Short leases (replayer partitions, controller): one holder at a time across the fleet.
CREATE TABLE bascule_lease (
    name        text PRIMARY KEY,
    holder      text NOT NULL,
    expires_at  timestamptz NOT NULL
);
