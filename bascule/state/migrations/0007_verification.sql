-- Stored-data verification and backfill ([7/12]): each run of `bascule verify` and of
-- `bascule backfill`, with a checkpoint per table so an interrupted run resumes where it
-- stopped. Figures are counts, rates and keyed record tokens: never a value. A resume position
-- is a record key, so it is sealed (AES-GCM, BASCULE_JOURNAL_KEY) like the journal's bodies.

CREATE TABLE bascule_verify_run (
    id             bigserial PRIMARY KEY,
    dataset        text NOT NULL,
    mode           text NOT NULL CHECK (mode IN ('full', 'incremental')),
    status         text NOT NULL DEFAULT 'running'
                       CHECK (status IN ('running', 'clean', 'divergent', 'failed', 'interrupted')),
    -- The side checked against the authority (the one whose gap a clean run closes), and the
    -- authority it was checked against, from the stage when the run started.
    verified       text NOT NULL CHECK (verified IN ('source', 'target')),
    authority      text NOT NULL CHECK (authority IN ('source', 'target')),
    stage          text NOT NULL,
    stage_version  bigint NOT NULL,
    actor          text NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    -- When the rows this run relies on began to be read: its own start, or that of the first
    -- run of a resumed chain. What a clean run proves holds from then on.
    swept_since    timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    resumed_from   bigint REFERENCES bascule_verify_run (id),
    backfill_run   bigint,          -- the backfill this verification ended, if any
    figures        jsonb NOT NULL DEFAULT '{}'::jsonb,
    error          text             -- what stopped a failed run: a class of error, never a value
);

-- What the gate asks: the latest clean verification of a dataset, and when it started.
CREATE INDEX bascule_verify_run_by_dataset ON bascule_verify_run (dataset, status, started_at);

CREATE VIEW bascule_verify_latest_clean AS
    SELECT DISTINCT ON (dataset) dataset, id AS run_id, mode, verified, swept_since, started_at,
        finished_at
    FROM bascule_verify_run WHERE status = 'clean'
    ORDER BY dataset, swept_since DESC, id DESC;

CREATE TABLE bascule_verify_checkpoint (
    run_id      bigint NOT NULL REFERENCES bascule_verify_run (id) ON DELETE CASCADE,
    tbl         text NOT NULL,      -- schema-qualified table name (not a value)
    done        boolean NOT NULL DEFAULT false,
    -- Sealed: where each side's scan stands (its next heap block and the chunk figures summed
    -- so far), the chunk thresholds (keys), and what differed. Hash sums are keyed too.
    position    bytea,
    figures     jsonb NOT NULL DEFAULT '{}'::jsonb,  -- counts only
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, tbl)
);

CREATE TABLE bascule_backfill_run (
    id             bigserial PRIMARY KEY,
    dataset        text NOT NULL,
    status         text NOT NULL DEFAULT 'running'
                       CHECK (status IN ('running', 'done', 'divergent', 'failed', 'interrupted')),
    stage_version  bigint NOT NULL,
    actor          text NOT NULL,
    started_at     timestamptz NOT NULL DEFAULT now(),
    finished_at    timestamptz,
    resumed_from   bigint REFERENCES bascule_backfill_run (id),
    -- Writes journaled from here on are settled at the end (deletes included): the journal's
    -- time when the first run of a resumed chain started.
    writes_since   timestamptz NOT NULL DEFAULT now(),
    verify_run     bigint REFERENCES bascule_verify_run (id),
    figures        jsonb NOT NULL DEFAULT '{}'::jsonb,
    error          text
);

CREATE INDEX bascule_backfill_run_by_dataset ON bascule_backfill_run (dataset, status, started_at);

CREATE TABLE bascule_backfill_checkpoint (
    run_id      bigint NOT NULL REFERENCES bascule_backfill_run (id) ON DELETE CASCADE,
    tbl         text NOT NULL,
    done        boolean NOT NULL DEFAULT false,
    position    bytea,              -- sealed: the last key copied (NULL: from the start)
    rows        bigint NOT NULL DEFAULT 0,
    bytes       bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, tbl)
);
