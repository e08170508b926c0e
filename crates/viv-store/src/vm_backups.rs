//! VM backup rows: what a backup of a VM holds (its kind, parent, disks, the dirty bitmap that
//! follows it); the data is in qcow2 files under `DATA_DIR/backups/VM-ID/`.
//!
//! Invariant: a row is inserted only after all of the backup's files are in place, and deleted
//! before they are removed, so a listed backup always has its files.

use super::db::{params, Row, Sql as _};

use super::{now_rfc3339_ms, Store, StoreError};

/// A VM backup row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmBackupRow {
    /// Id (`bk-...`), also the stem of its files.
    pub id: String,
    /// The VM's id.
    pub vm_id: String,
    /// `full` or `incremental`.
    pub kind: String,
    /// The backup an incremental one adds to.
    pub parent_id: Option<String>,
    /// JSON array of `{disk, virtualSize}`.
    pub disks: String,
    /// The dirty bitmap added in each disk when it was taken.
    pub bitmap: String,
    /// Whether the VM was running.
    pub live: bool,
    /// RFC 3339 (set on insert).
    pub created_at: String,
}

const COLUMNS: &str = "id, vm_id, kind, parent_id, disks, bitmap, live, created_at";

fn backup_row(r: &Row) -> Result<VmBackupRow, StoreError> {
    Ok(VmBackupRow {
        id: r.get(0)?,
        vm_id: r.get(1)?,
        kind: r.get(2)?,
        parent_id: r.get(3)?,
        disks: r.get(4)?,
        bitmap: r.get(5)?,
        live: r.get(6)?,
        created_at: r.get(7)?,
    })
}

impl Store {
    /// Records a backup whose files are complete; its time is set here.
    pub fn insert_vm_backup(&self, row: &VmBackupRow) -> Result<VmBackupRow, StoreError> {
        let mut row = row.clone();
        row.created_at = now_rfc3339_ms();
        self.conn().execute(
            "INSERT INTO vm_backups (id, vm_id, kind, parent_id, disks, bitmap, live, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                row.id,
                row.vm_id,
                row.kind,
                row.parent_id,
                row.disks,
                row.bitmap,
                row.live,
                row.created_at
            ],
        )?;
        Ok(row)
    }

    /// A VM's backups, oldest first.
    pub fn vm_backups(&self, vm_id: &str) -> Result<Vec<VmBackupRow>, StoreError> {
        let mut conn = self.conn();
        conn.query_map(
            &format!("SELECT {COLUMNS} FROM vm_backups WHERE vm_id = ?1 ORDER BY created_at, rowid"),
            params![vm_id],
            backup_row,
        )
    }

    /// One backup of a VM.
    pub fn vm_backup(&self, vm_id: &str, id: &str) -> Result<Option<VmBackupRow>, StoreError> {
        self.conn().query_row(
            &format!("SELECT {COLUMNS} FROM vm_backups WHERE vm_id = ?1 AND id = ?2"),
            params![vm_id, id],
            backup_row,
        )
    }

    /// Every backup id of every VM (to find files no row lists).
    pub fn all_vm_backup_ids(&self) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn();
        conn.query_map("SELECT vm_id, id FROM vm_backups", params![], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
    }

    /// Deletes a backup row, making its child (if any) a child of its parent with `kind`
    /// (the caller rebased the child's files first).
    pub fn delete_vm_backup(&self, row: &VmBackupRow, child_kind: &str) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
            tx.execute(
                "UPDATE vm_backups SET parent_id = ?2, kind = CASE WHEN CAST(?2 AS TEXT) IS NULL THEN ?3 ELSE kind END
             WHERE vm_id = ?1 AND parent_id = ?4",
                params![row.vm_id, row.parent_id, child_kind, row.id],
            )?;
            tx.execute("DELETE FROM vm_backups WHERE id = ?1", params![row.id])?;
            Ok(())
        })
    }

    /// Deletes every backup row of a VM.
    pub fn delete_vm_backups(&self, vm_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM vm_backups WHERE vm_id = ?1", params![vm_id])?;
        Ok(())
    }
}
