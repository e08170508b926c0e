-- The VM manager's running VMs: the QEMU process of an active VM (so that a restarted server
-- takes it over), when it started, how often, and why it last stopped.
ALTER TABLE vms ADD COLUMN pid INTEGER;
ALTER TABLE vms ADD COLUMN pid_start_time INTEGER;
ALTER TABLE vms ADD COLUMN started_at TEXT;
ALTER TABLE vms ADD COLUMN starts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE vms ADD COLUMN last_exit TEXT;
