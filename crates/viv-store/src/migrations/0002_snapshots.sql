-- Snapshot nodes: a frozen disk layer plus saved VM state (memory included). Nodes form a tree:
-- a node's disk layer is backed by its parent's (or, for a root node, the template's).
CREATE TABLE snapshots (
    id           TEXT PRIMARY KEY,
    parent_id    TEXT REFERENCES snapshots (id),
    sandbox_id   TEXT NOT NULL,
    template_id  TEXT NOT NULL,
    kind         TEXT NOT NULL,      -- 'pause' | 'fork' | 'snapshot'
    name         TEXT UNIQUE,
    cpu_count    INTEGER NOT NULL,
    memory_mb    INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    created_at   TEXT NOT NULL,
    guest_token  TEXT                -- the access token the saved agent expects
);

-- The node a sandbox's state descends from (its disk overlay is backed by that node's layer);
-- for a paused sandbox, the node that holds it.
ALTER TABLE sandboxes ADD COLUMN snapshot_id TEXT REFERENCES snapshots (id);
-- Pause instead of kill when the timeout passes.
ALTER TABLE sandboxes ADD COLUMN auto_pause INTEGER NOT NULL DEFAULT 0;
