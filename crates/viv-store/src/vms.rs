//! VM rows: a definition (JSON written by this server), an optional pending definition and a
//! state.
//!
//! Invariants: names are unique (the insert or rename that would break it changes nothing and
//! reports the clash); a state change records its time in the same statement.

use super::db::{params, Row, Sql as _};

use super::{now_rfc3339, Store, StoreError};

/// A VM row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmRow {
    /// Id.
    pub id: String,
    /// Name, unique.
    pub name: String,
    /// JSON of its `VmDefinition`.
    pub definition: String,
    /// JSON of the definition its next start takes, when edited while running.
    pub pending_definition: Option<String>,
    /// `VmState` as the API names it.
    pub state: String,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub state_changed_at: String,
    /// Its QEMU process while active.
    pub process: Option<viv_vmm::ProcessIdentity>,
    /// When it last started, RFC 3339.
    pub started_at: Option<String>,
    /// How many times it has started.
    pub starts: u32,
    /// Why it last stopped (or failed to start).
    pub last_exit: Option<String>,
}

pub(super) const COLUMNS: &str = "id, name, definition, pending_definition, state, created_at, state_changed_at, \
    pid, pid_start_time, started_at, starts, last_exit";

pub(super) fn vm_row(r: &Row) -> Result<VmRow, StoreError> {
    Ok(VmRow {
        id: r.get(0)?,
        name: r.get(1)?,
        definition: r.get(2)?,
        pending_definition: r.get(3)?,
        state: r.get(4)?,
        created_at: r.get(5)?,
        state_changed_at: r.get(6)?,
        process: match (r.get::<Option<i64>>(7)?, r.get::<Option<i64>>(8)?) {
            (Some(pid), Some(start_time)) => Some(viv_vmm::ProcessIdentity {
                pid: pid as u32,
                start_time: start_time as u64,
            }),
            _ => None,
        },
        started_at: r.get(9)?,
        starts: r.get(10)?,
        last_exit: r.get(11)?,
    })
}

impl Store {
    /// Records a new VM (its times are set here); `Ok(false)` when its name is taken.
    pub fn insert_vm(&self, id: &str, name: &str, definition: &str, state: &str) -> Result<bool, StoreError> {
        let now = now_rfc3339();
        let n = self.conn().execute(
            "INSERT INTO vms (id, name, definition, state, created_at, state_changed_at, node_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6) ON CONFLICT DO NOTHING",
            params![id, name, definition, state, now, self.node_id()],
        )?;
        Ok(n == 1)
    }

    /// A VM by id or, failing that, by name.
    pub fn vm(&self, id_or_name: &str) -> Result<Option<VmRow>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM vms WHERE id = ?1 UNION ALL SELECT {COLUMNS} FROM vms WHERE name = ?1 AND id <> ?1 LIMIT 1");
        self.conn().query_row(&sql, params![id_or_name], vm_row)
    }

    /// Every VM, by name.
    pub fn list_vms(&self) -> Result<Vec<VmRow>, StoreError> {
        let mut conn = self.conn();
        let rows = conn.query_map(&format!("SELECT {COLUMNS} FROM vms ORDER BY name"), params![], vm_row)?;
        Ok(rows)
    }

    /// Replaces a VM's definition and pending definition; `Ok(false)` when it is gone.
    pub fn update_vm_definition(&self, id: &str, definition: &str, pending: Option<&str>) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET definition = ?2, pending_definition = ?3 WHERE id = ?1",
            params![id, definition, pending],
        )?;
        Ok(n == 1)
    }

    /// Sets a VM's state; `Ok(false)` when it is gone.
    pub fn set_vm_state(&self, id: &str, state: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET state = ?2, state_changed_at = ?3 WHERE id = ?1",
            params![id, state, now_rfc3339()],
        )?;
        Ok(n == 1)
    }

    /// Records that a VM's QEMU runs as `process`: its state becomes `state` (`running` or
    /// `paused`), its start is counted, its pending definition (if any) became its definition.
    pub fn set_vm_started(
        &self,
        id: &str,
        definition: &str,
        state: &str,
        process: viv_vmm::ProcessIdentity,
    ) -> Result<bool, StoreError> {
        let now = now_rfc3339();
        let n = self.conn().execute(
            "UPDATE vms SET definition = ?2, pending_definition = NULL, state = ?3, state_changed_at = ?4,
                pid = ?5, pid_start_time = ?6, started_at = ?4, starts = starts + 1, last_exit = NULL
             WHERE id = ?1",
            params![
                id,
                definition,
                state,
                now,
                process.pid as i64,
                process.start_time as i64
            ],
        )?;
        Ok(n == 1)
    }

    /// Records that a VM's QEMU is gone: its state becomes `state` (`stopped`, `crashed`, or
    /// what it was before a start that failed), with why.
    ///
    /// Only the row's own node (or a store of no cluster) writes it: a VM that moved to another
    /// node leaves its row alone when its old QEMU quits. `Ok(false)` when it is gone or moved.
    pub fn set_vm_exited(&self, id: &str, state: &str, last_exit: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET state = ?2, state_changed_at = ?3, pid = NULL, pid_start_time = NULL, last_exit = ?4
             WHERE id = ?1 AND (node_id IS NULL OR ?5 = '' OR node_id = ?5)",
            params![id, state, now_rfc3339(), last_exit, self.node_id().unwrap_or_default()],
        )?;
        Ok(n == 1)
    }

    /// Takes over VM `id` from node `from` (a live migration between nodes finished here): the
    /// row names this node and records its QEMU as `process`, running. `Ok(false)`, changing
    /// nothing, when the row is gone or no longer names `from`.
    pub fn take_over_vm(&self, id: &str, from: &str, process: viv_vmm::ProcessIdentity) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET node_id = ?3, state = 'running', state_changed_at = ?4, pid = ?5, pid_start_time = ?6,
                last_exit = NULL
             WHERE id = ?1 AND node_id = ?2",
            params![
                id,
                from,
                self.node_id().unwrap_or_default(),
                now_rfc3339(),
                process.pid as i64,
                process.start_time as i64
            ],
        )?;
        Ok(n == 1)
    }

    /// Takes over stopped VM `id` from node `from` (its disks were copied here): the row names
    /// this node. `Ok(false)`, changing nothing, when the row is gone, no longer names `from`,
    /// or its VM became active.
    pub fn take_over_stopped_vm(&self, id: &str, from: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE vms SET node_id = ?3 WHERE id = ?1 AND node_id = ?2
               AND state NOT IN ('starting', 'running', 'paused', 'stopping')",
            params![id, from, self.node_id().unwrap_or_default()],
        )?;
        Ok(n == 1)
    }

    /// Renames a VM. `Ok(None)` when it is gone, `Ok(Some(false))` when the name is taken.
    pub fn rename_vm(&self, id: &str, name: &str) -> Result<Option<bool>, StoreError> {
        let mut conn = self.conn();
        let exists: bool = conn
            .query_row("SELECT EXISTS (SELECT 1 FROM vms WHERE id = ?1)", params![id], |r| {
                r.get(0)
            })?
            .unwrap_or(false);
        if !exists {
            return Ok(None);
        }
        let n = conn.execute(
            "UPDATE vms SET name = ?2 WHERE id = ?1 AND NOT EXISTS (SELECT 1 FROM vms WHERE name = ?2 AND id <> ?1)",
            params![id, name],
        )?;
        Ok(Some(n == 1))
    }

    /// Deletes a VM's row; `Ok(false)` when it was gone.
    pub fn delete_vm(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM vms WHERE id = ?1", params![id])? == 1)
    }
}
