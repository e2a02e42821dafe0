-- Stages: one row per dataset, changed only by compare-and-set on `version`, in the same
-- transaction as its audit row.
CREATE TABLE bascule_stage (
    dataset     text PRIMARY KEY,
    stage       text NOT NULL CHECK (stage IN ('source', 'dualwrite', 'shadow', 'live', 'rampdown', 'target')),
    version     bigint NOT NULL CHECK (version > 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    updated_by  text NOT NULL,
    reason      text NOT NULL
);

-- Append-only record of every change an operator (or the controller) made.
CREATE TABLE bascule_audit (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    dataset       text NOT NULL,
    action        text NOT NULL,
    actor         text NOT NULL,
    from_stage    text,
    to_stage      text,
    from_version  bigint,
    to_version    bigint,
    reason        text NOT NULL,
    forced        boolean NOT NULL DEFAULT false,
    details       jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX bascule_audit_dataset ON bascule_audit (dataset, id);
