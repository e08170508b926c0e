//! VM snapshot rows: what a snapshot of a VM holds (memory or disks only, the definition it was
//! taken with) and its place in the VM's tree; the data itself is inside the VM's qcow2 disks.
//!
//! Invariants: names are unique per VM; deleting a snapshot moves its children to its parent and
//! a VM whose current snapshot it was to its parent, in one transaction.

use super::db::{params, Row, Sql as _};

use super::{now_rfc3339, Store, StoreError};

/// A VM snapshot row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSnapshotRow {
    /// Id, also the tag of the internal snapshots in the disks.
    pub id: String,
    /// The VM's id.
    pub vm_id: String,
    /// Name, unique per VM.
    pub name: String,
    /// The snapshot it descends from.
    pub parent_id: Option<String>,
    /// Whether memory and device state are included.
    pub memory: bool,
    /// The VM's state when taken (`running`, `paused`, `stopped`, ...).
    pub vm_state: String,
    /// JSON of the VM's definition when taken.
    pub definition: String,
    /// Free text.
    pub description: String,
    /// RFC 3339.
    pub created_at: String,
}

const COLUMNS: &str = "id, vm_id, name, parent_id, memory, vm_state, definition, description, created_at";

fn snapshot_row(r: &Row) -> Result<VmSnapshotRow, StoreError> {
    Ok(VmSnapshotRow {
        id: r.get(0)?,
        vm_id: r.get(1)?,
        name: r.get(2)?,
        parent_id: r.get(3)?,
        memory: r.get(4)?,
        vm_state: r.get(5)?,
        definition: r.get(6)?,
        description: r.get(7)?,
        created_at: r.get(8)?,
    })
}

impl Store {
    /// Records a snapshot (its time is set here) and makes it its VM's current snapshot;
    /// `Ok(false)` when the VM has a snapshot of that name.
    pub fn insert_vm_snapshot(&self, row: &VmSnapshotRow) -> Result<bool, StoreError> {
        self.db.transaction(|tx| {
        let n = tx.execute(
            "INSERT INTO vm_snapshots (id, vm_id, name, parent_id, memory, vm_state, definition, description, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT DO NOTHING",
            params![
                row.id,
                row.vm_id,
                row.name,
                row.parent_id,
                row.memory,
                row.vm_state,
                row.definition,
                row.description,
                now_rfc3339()
            ],
        )?;
        if n == 1 {
            tx.execute(
                "UPDATE vms SET current_snapshot = ?2 WHERE id = ?1",
                params![row.vm_id, row.id],
            )?;
        }
                Ok(n == 1)
        })
    }

    /// A VM's snapshots, oldest first.
    pub fn vm_snapshots(&self, vm_id: &str) -> Result<Vec<VmSnapshotRow>, StoreError> {
        let mut conn = self.conn();
        let rows = conn.query_map(
            &format!("SELECT {COLUMNS} FROM vm_snapshots WHERE vm_id = ?1 ORDER BY created_at, rowid"),
            params![vm_id],
            snapshot_row,
        )?;
        Ok(rows)
    }

    /// A VM's snapshot by id or name.
    pub fn vm_snapshot(&self, vm_id: &str, id_or_name: &str) -> Result<Option<VmSnapshotRow>, StoreError> {
        self.conn().query_row(
            &format!(
                "SELECT {COLUMNS} FROM vm_snapshots WHERE vm_id = ?1 AND (id = ?2 OR name = ?2)
                     ORDER BY id = ?2 DESC LIMIT 1"
            ),
            params![vm_id, id_or_name],
            snapshot_row,
        )
    }

    /// A VM's current snapshot.
    pub fn vm_current_snapshot(&self, vm_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT current_snapshot FROM vms WHERE id = ?1", params![vm_id], |r| {
                r.get(0)
            })?
            .flatten())
    }

    /// Where a VM's root disk came from (`snapshot:ID`, `template:NAME`), for VMs made from
    /// sandboxes.
    pub fn vm_origin(&self, vm_id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT origin FROM vms WHERE id = ?1", params![vm_id], |r| r.get(0))?
            .flatten())
    }

    /// Records where a VM's root disk came from.
    pub fn set_vm_origin(&self, vm_id: &str, origin: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("UPDATE vms SET origin = ?2 WHERE id = ?1", params![vm_id, origin])?;
        Ok(())
    }

    /// Makes `snapshot` a VM's current snapshot.
    pub fn set_vm_current_snapshot(&self, vm_id: &str, snapshot: Option<&str>) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE vms SET current_snapshot = ?2 WHERE id = ?1",
            params![vm_id, snapshot],
        )?;
        Ok(())
    }

    /// Deletes a snapshot row: its children and, if it was current, its VM move to its parent.
    pub fn delete_vm_snapshot(&self, row: &VmSnapshotRow) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
            tx.execute(
                "UPDATE vm_snapshots SET parent_id = ?2 WHERE parent_id = ?1",
                params![row.id, row.parent_id],
            )?;
            tx.execute(
                "UPDATE vms SET current_snapshot = ?2 WHERE current_snapshot = ?1",
                params![row.id, row.parent_id],
            )?;
            tx.execute("DELETE FROM vm_snapshots WHERE id = ?1", params![row.id])?;
            Ok(())
        })
    }

    /// Deletes every snapshot row of a VM.
    pub fn delete_vm_snapshots(&self, vm_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM vm_snapshots WHERE vm_id = ?1", params![vm_id])?;
        Ok(())
    }
}
