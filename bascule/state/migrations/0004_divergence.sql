-- Every mismatch found by a shadow read ([5/10]): the gate's evidence must survive a Redis
-- restart. Pointers and kinds only: never a value, never a value hash.
CREATE TABLE bascule_mismatch (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    dataset      text NOT NULL,
    route        text NOT NULL,   -- the route template, never a concrete path
    differences  jsonb NOT NULL,  -- [[part, pointer, kind], ...] (pointers tokenized)
    truncated    int NOT NULL DEFAULT 0,
    trace_id     text
);
CREATE INDEX bascule_mismatch_dataset ON bascule_mismatch (dataset, at);
