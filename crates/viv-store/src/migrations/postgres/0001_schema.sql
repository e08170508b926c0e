-- The schema SQLite's migrations 0001-0023 reach, for PostgreSQL (the column comments are in
-- those files). Integers are BIGINT throughout (the store binds every integer as 64 bits);
-- SQLite's triggers that removed a deleted sandbox's traffic token and owner are statements of
-- Store::delete_sandbox on both engines. Tables whose lists break ties of equal times by SQLite's
-- rowid have `seq` instead (the store's queries name `rowid`; see store/db.rs).
CREATE TABLE api_keys (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    prefix      TEXT NOT NULL,
    key_sha256  TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    revoked_at  TEXT
);

CREATE TABLE snapshots (
    id           TEXT PRIMARY KEY,
    parent_id    TEXT REFERENCES snapshots (id),
    sandbox_id   TEXT NOT NULL,
    template_id  TEXT NOT NULL,
    kind         TEXT NOT NULL,
    name         TEXT UNIQUE,
    cpu_count    BIGINT NOT NULL,
    memory_mb    BIGINT NOT NULL,
    bytes        BIGINT NOT NULL,
    created_at   TEXT NOT NULL,
    guest_token  TEXT,
    network      TEXT
);

CREATE TABLE sandboxes (
    id            TEXT PRIMARY KEY,
    template_id   TEXT NOT NULL,
    state         TEXT NOT NULL,
    started_at    TEXT NOT NULL,
    end_at_ms     BIGINT NOT NULL,
    cpu_count     BIGINT NOT NULL,
    memory_mb     BIGINT NOT NULL,
    metadata      TEXT NOT NULL,
    access_token  TEXT,
    vmm_pid       BIGINT,
    error         TEXT,
    snapshot_id   TEXT REFERENCES snapshots (id),
    auto_pause    BIGINT NOT NULL DEFAULT 0,
    internet      BIGINT NOT NULL DEFAULT 1,
    network       TEXT,
    vmm_identity  TEXT,
    net_slot      BIGINT
);

CREATE TABLE templates (
    name          TEXT PRIMARY KEY,
    from_name     TEXT NOT NULL,
    layer         TEXT NOT NULL,
    config        TEXT NOT NULL,
    start_cmd     TEXT,
    ready_cmd     TEXT,
    cpu_count     BIGINT NOT NULL,
    memory_mb     BIGINT NOT NULL,
    spec          TEXT NOT NULL,
    layers        TEXT NOT NULL,
    created_at    TEXT NOT NULL,
    build_ms      BIGINT NOT NULL
);

CREATE TABLE sandbox_lifecycle (
    sandbox_id    TEXT PRIMARY KEY,
    auto_resume   BIGINT NOT NULL DEFAULT 0,
    pause_memory  BIGINT NOT NULL DEFAULT 1,
    timeout_secs  BIGINT NOT NULL,
    env_vars      TEXT
);

CREATE TABLE sandbox_traffic (
    sandbox_id  TEXT PRIMARY KEY,
    token       TEXT NOT NULL
);

CREATE TABLE template_builds (
    name      TEXT PRIMARY KEY,
    build_id  TEXT NOT NULL
);

CREATE TABLE volumes (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token       TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE sandbox_volumes (
    sandbox_id  TEXT NOT NULL,
    volume_id   TEXT NOT NULL REFERENCES volumes (id),
    path        TEXT NOT NULL,
    PRIMARY KEY (sandbox_id, path)
);

CREATE TABLE vms (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL UNIQUE,
    definition          TEXT NOT NULL,
    pending_definition  TEXT,
    state               TEXT NOT NULL,
    created_at          TEXT NOT NULL,
    state_changed_at    TEXT NOT NULL,
    pid                 BIGINT,
    pid_start_time      BIGINT,
    started_at          TEXT,
    starts              BIGINT NOT NULL DEFAULT 0,
    last_exit           TEXT,
    current_snapshot    TEXT,
    origin              TEXT
);

CREATE TABLE vm_snapshots (
    id           TEXT PRIMARY KEY,
    vm_id        TEXT NOT NULL,
    name         TEXT NOT NULL,
    parent_id    TEXT,
    memory       BIGINT NOT NULL,
    vm_state     TEXT NOT NULL,
    definition   TEXT NOT NULL,
    description  TEXT NOT NULL DEFAULT '',
    created_at   TEXT NOT NULL,
    seq          BIGSERIAL,
    UNIQUE (vm_id, name)
);

CREATE TABLE ssh_keys (
    id           TEXT PRIMARY KEY,
    api_key_id   TEXT NOT NULL REFERENCES api_keys (id),
    algorithm    TEXT NOT NULL,
    fingerprint  TEXT NOT NULL UNIQUE,
    public_key   TEXT NOT NULL,
    comment      TEXT NOT NULL,
    created_at   TEXT NOT NULL
);
CREATE INDEX ssh_keys_api_key ON ssh_keys (api_key_id);

CREATE TABLE sandbox_owners (
    sandbox_id  TEXT PRIMARY KEY,
    api_key_id  TEXT NOT NULL
);

CREATE TABLE web_sessions (
    token_sha256   TEXT PRIMARY KEY,
    key_id         TEXT NOT NULL REFERENCES api_keys (id) ON DELETE CASCADE,
    created_at     TEXT NOT NULL,
    expires_at_ms  BIGINT NOT NULL
);
CREATE INDEX web_sessions_expiry ON web_sessions (expires_at_ms);

CREATE TABLE template_versions (
    id          TEXT PRIMARY KEY,
    template    TEXT NOT NULL,
    parent      TEXT,
    created_at  TEXT NOT NULL,
    seq         BIGSERIAL
);
CREATE INDEX template_versions_by_template ON template_versions (template, created_at);

CREATE TABLE template_tags (
    template  TEXT NOT NULL,
    tag       TEXT NOT NULL,
    version   TEXT NOT NULL,
    PRIMARY KEY (template, tag)
);

CREATE TABLE switches (
    name        TEXT PRIMARY KEY,
    idx         BIGINT NOT NULL UNIQUE,
    definition  TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE vm_backups (
    id          TEXT PRIMARY KEY,
    vm_id       TEXT NOT NULL,
    kind        TEXT NOT NULL,
    parent_id   TEXT,
    disks       TEXT NOT NULL,
    bitmap      TEXT NOT NULL,
    live        BIGINT NOT NULL,
    created_at  TEXT NOT NULL,
    seq         BIGSERIAL
);
CREATE INDEX vm_backups_vm ON vm_backups (vm_id);
