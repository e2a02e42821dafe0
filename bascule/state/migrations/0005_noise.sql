-- Noise proposals ([5/10]): what differs between two answers of the *same* side to the same
-- request, with no write to the dataset in between. A pointer pattern seen differing in enough
-- independent pairs is proposed as a rule; an SRE accepts or rejects it (audited in
-- bascule_audit). Patterns and field names only: never a value, never a value hash.
CREATE TABLE bascule_noise (
    dataset     text NOT NULL,
    route       text NOT NULL,   -- the route template, never a concrete path
    pointer     text NOT NULL,   -- a pattern: positions and tokenized member names are '*'
    rule        text NOT NULL CHECK (rule IN ('ignore', 'unordered')),
    key         text,            -- unordered: the field naming an element; NULL for ignore
    pairs       bigint NOT NULL DEFAULT 1 CHECK (pairs > 0),  -- independent pairs seen differing
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_seen   timestamptz NOT NULL DEFAULT now(),
    decision    text CHECK (decision IN ('accepted', 'rejected')),
    decided_by  text,
    decided_at  timestamptz,
    reason      text,
    CHECK ((rule = 'unordered') = (key IS NOT NULL)),
    CHECK ((decision IS NULL) = (decided_by IS NULL AND decided_at IS NULL AND reason IS NULL))
);
CREATE UNIQUE INDEX bascule_noise_proposal
    ON bascule_noise (dataset, route, pointer, rule, (coalesce(key, '')));
CREATE INDEX bascule_noise_accepted ON bascule_noise (dataset) WHERE decision = 'accepted';

-- Bumped in the transaction of every decision, whose row lock also serializes a dataset's
-- decisions: replicas compare the sum with the one they loaded (a counter, not a high-water
-- mark of ids, which a slower transaction could commit below).
CREATE TABLE bascule_noise_version (
    dataset  text PRIMARY KEY,
    version  bigint NOT NULL CHECK (version > 0)
);
