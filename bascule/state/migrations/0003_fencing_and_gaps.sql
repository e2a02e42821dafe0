-- Fencing, replica confirmation and gaps ([4/10]).

-- write_epoch: bumped by every change that alters writes (who is authoritative, which sides are
-- written), under the dataset's exclusive fence. A write records the epoch it was planned under;
-- its outcome is only recorded under that same epoch.
ALTER TABLE bascule_stage ADD COLUMN write_epoch bigint NOT NULL DEFAULT 1;

-- Gap markers: since when a side has missed writes (NULL: no gap). The target has one from the
-- start, until it has been backfilled and verified; the source gets one when writes stop reaching
-- it. A side with a gap may not become serving or authoritative unless the gap is closed.
ALTER TABLE bascule_stage ADD COLUMN gap_source_since timestamptz;
ALTER TABLE bascule_stage ADD COLUMN gap_target_since timestamptz DEFAULT now();
UPDATE bascule_stage SET gap_target_since = NULL WHERE stage NOT IN ('source', 'dualwrite');
UPDATE bascule_stage SET gap_source_since = now() WHERE stage = 'target';

-- Each live replica reports, under a lease, the stage version it runs for every dataset.
CREATE TABLE bascule_replica (
    name        text PRIMARY KEY,
    versions    jsonb NOT NULL,          -- {"dataset": version, ...}
    seen_at     timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL
);

-- The write epoch each journaled write was planned under (read under the dataset's fence).
ALTER TABLE bascule_journal ADD COLUMN write_epoch bigint;
