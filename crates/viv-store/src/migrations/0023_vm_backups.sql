-- Backups of the VM manager's VMs' writable disks. The data lives in DATA_DIR/backups/VM-ID/
-- as one qcow2 file per disk (`BACKUP-ID-N.qcow2`), an incremental backup's files backed by
-- its parent's; a row is written only once every file is complete, so a backup cut short by a
-- crash is never listed (its files are removed when the server starts).
CREATE TABLE vm_backups (
    id TEXT PRIMARY KEY,
    vm_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    parent_id TEXT,
    -- JSON array of {disk, virtualSize} in the VM's disk order.
    disks TEXT NOT NULL,
    -- The dirty bitmap (in each disk) that marks what changed since this backup.
    bitmap TEXT NOT NULL,
    live INTEGER NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX vm_backups_vm ON vm_backups (vm_id);
