-- Templates built from specs. A template is its final disk layer (a chain of step layers down to
-- the layer of what it was built FROM) plus what its sandboxes inherit and start with.
CREATE TABLE templates (
    name          TEXT PRIMARY KEY,
    from_name     TEXT NOT NULL,
    layer         TEXT NOT NULL,     -- path of the final disk layer
    config        TEXT NOT NULL,     -- JSON: env, workdir, user
    start_cmd     TEXT,              -- JSON command (CMD)
    ready_cmd     TEXT,              -- JSON command and interval (HEALTHCHECK CMD)
    cpu_count     INTEGER NOT NULL,
    memory_mb     INTEGER NOT NULL,
    spec          TEXT NOT NULL,
    layers        TEXT NOT NULL,     -- JSON list of the layer keys this template keeps alive
    created_at    TEXT NOT NULL,
    build_ms      INTEGER NOT NULL
);
