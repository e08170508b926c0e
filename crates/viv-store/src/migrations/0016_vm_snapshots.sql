-- Snapshots of the VM manager's VMs. The data lives inside the VM's qcow2 disks as internal
-- snapshots tagged with the snapshot's id (memory and device state in its first writable disk);
-- a row records what the snapshot holds and where it sits in the VM's tree of snapshots.
CREATE TABLE vm_snapshots (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    name TEXT NOT NULL,
    parent_id TEXT,
    memory INTEGER NOT NULL,
    vm_state TEXT NOT NULL,
    definition TEXT NOT NULL,
    description TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL,
    UNIQUE (vm_id, name)
);
-- The snapshot a VM's state descends from (the last taken or reverted to).
ALTER TABLE vms ADD COLUMN current_snapshot TEXT;
