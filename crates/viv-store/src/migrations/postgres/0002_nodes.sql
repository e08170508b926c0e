-- Nodes: the servers that run VMs for this store. A node registers when it starts (its id is
-- kept in its data directory, so a restarted server is the same node) and refreshes
-- `heartbeat_ms` while it runs; any server marks a node `down` once its heartbeat is older
-- than the down time. `capacity` is the node's JSON report (vCPUs, memory, disk, accelerator,
-- network mode, free memory and CPUs, templates it holds).
CREATE TABLE nodes (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    url           TEXT NOT NULL,
    role          TEXT NOT NULL,
    state         TEXT NOT NULL,
    capacity      TEXT NOT NULL,
    started_at    TEXT NOT NULL,
    heartbeat_ms  BIGINT NOT NULL,
    down_since    TEXT
);
-- The node a sandbox or VM runs on (or, paused, whose data directory holds its files), and the
-- node whose data directory holds a snapshot node's files. NULL in rows written before nodes
-- existed: the first node to start claims them.
ALTER TABLE sandboxes ADD COLUMN node_id TEXT;
ALTER TABLE vms ADD COLUMN node_id TEXT;
ALTER TABLE snapshots ADD COLUMN node_id TEXT;
-- Likewise the node whose data directory holds a volume's files.
ALTER TABLE volumes ADD COLUMN node_id TEXT;
-- The secret the cluster's nodes authenticate their requests to each other with (the node API
-- under /internal), made by the first server to start. Whoever can read this database is trusted
-- with every node anyway.
CREATE TABLE cluster_secret (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    secret  TEXT NOT NULL
);
