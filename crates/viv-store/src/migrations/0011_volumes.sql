-- E2B volumes: named directories under the data directory (`volumes/<id>`), with the bearer
-- token of their content API. `sandbox_volumes` records which sandbox mounts which volume
-- where; a volume with a mount by a sandbox that is not gone cannot be destroyed.
CREATE TABLE volumes (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    token TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE sandbox_volumes (
    sandbox_id TEXT NOT NULL,
    volume_id TEXT NOT NULL REFERENCES volumes(id),
    path TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, path)
);
