-- The gate ([7/12]): its evidence is read from Postgres and tied to the stage version the
-- shadow reads were served under, so that a flip never counts the previous stage's figures.
ALTER TABLE bascule_mismatch ADD COLUMN stage_version bigint NOT NULL DEFAULT 0;
CREATE INDEX bascule_mismatch_version ON bascule_mismatch (dataset, stage_version, at);

ALTER TABLE bascule_shadow_error ADD COLUMN stage_version bigint NOT NULL DEFAULT 0;
ALTER TABLE bascule_shadow_error DROP CONSTRAINT bascule_shadow_error_pkey;
ALTER TABLE bascule_shadow_error ADD PRIMARY KEY (dataset, stage_version, minute, route, reason);

-- Shadow-read outcomes per minute, route and stage version (Redis keeps the fast per-minute
-- counters; these are the gate's: they outlive a Redis restart). An outcome is a class, never
-- a value.
CREATE TABLE bascule_shadow_count (
    dataset        text NOT NULL,
    stage_version  bigint NOT NULL,
    route          text NOT NULL,
    outcome        text NOT NULL,
    minute         timestamptz NOT NULL,
    n              bigint NOT NULL,
    PRIMARY KEY (dataset, stage_version, minute, route, outcome)
);

-- The latest batch of gate counts each tally wrote: a flush whose commit was not acknowledged
-- is sent again as the same batch, and counted once (one row per tally, i.e. per process).
CREATE TABLE bascule_shadow_flush (
    writer      text PRIMARY KEY,
    batch       bigint NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- When each side last missed a write (never cleared by closing its gap): the gate wants a clean
-- verification whose rows were read after it. A gap closed before this migration left no time
-- behind: every dataset then needs a verification made after it (conservative, never
-- forgetful).
ALTER TABLE bascule_stage ADD COLUMN gap_source_opened timestamptz;
ALTER TABLE bascule_stage ADD COLUMN gap_target_opened timestamptz DEFAULT now();
UPDATE bascule_stage SET gap_source_opened = coalesce(gap_source_since, now()),
    gap_target_opened = coalesce(gap_target_since, now());

-- auto_promote as operators and the controller left it: NULL follows the configuration; an
-- automatic rollback sets it false, and only an operator turns it back on (audited).
ALTER TABLE bascule_stage ADD COLUMN auto_promote boolean;
