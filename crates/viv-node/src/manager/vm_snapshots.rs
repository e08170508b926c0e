//! Snapshots of the VM manager's VMs: taken with or without memory, listed as a tree per VM,
//! reverted to, deleted.
//!
//! A snapshot is an internal snapshot, tagged with the snapshot's id, in each writable qcow2
//! disk of the VM (memory and device state in the first), taken by the VM's QEMU while it runs
//! and by `qemu-img` while it is stopped. Snapshots of one VM are independent of each other
//! inside the disks, so deleting one never touches another: the tree (each snapshot's parent is
//! the VM's current snapshot when it was taken) is bookkeeping in the store.
//!
//! Invariants:
//! - a snapshot's operations hold the VM's gate, so no start or stop runs beside them;
//! - a snapshot with memory is reverted only into a VM whose devices are those it was taken
//!   with (QEMU cannot load device state into other devices): every definition field but the
//!   ones a running VM takes at once must match;
//! - a disk-only snapshot is reverted only while the VM is stopped (its disks change under a
//!   running guest otherwise);
//! - a failed take leaves no row and removes what it wrote to the disks.

use std::sync::Arc;

use viv_api::vms::{NewVmSnapshot, VmDefinition, VmSnapshot, VmState};
use viv_storage::snapshot::SnapshotAction;

use super::vms::{definition_of, state_of, to_json, writable_disks, LIVE_FIELDS};
use super::Manager;
use crate::error::ApiError;
use crate::store::{VmRow, VmSnapshotRow};

impl Manager {
    /// A VM's snapshots, oldest first.
    pub fn list_vm_snapshots(&self, vm: &str) -> Result<Vec<VmSnapshot>, ApiError> {
        let row = self.vm_row(vm)?;
        let current = self.store.vm_current_snapshot(&row.id)?;
        self.store
            .vm_snapshots(&row.id)?
            .iter()
            .map(|s| snapshot_info(s, current.as_deref()))
            .collect()
    }

    /// One snapshot of a VM, by id or name.
    pub fn vm_snapshot(&self, vm: &str, snapshot: &str) -> Result<VmSnapshot, ApiError> {
        let row = self.vm_row(vm)?;
        let snap = self.snapshot_row(&row, snapshot)?;
        snapshot_info(&snap, self.store.vm_current_snapshot(&row.id)?.as_deref())
    }

    fn snapshot_row(&self, vm: &VmRow, snapshot: &str) -> Result<VmSnapshotRow, ApiError> {
        self.store
            .vm_snapshot(&vm.id, snapshot)?
            .ok_or_else(|| ApiError::NotFound(format!("VM '{}' has no snapshot '{snapshot}'", vm.name)))
    }

    /// Takes a snapshot of a VM.
    pub async fn create_vm_snapshot(self: &Arc<Self>, vm: &str, req: NewVmSnapshot) -> Result<VmSnapshot, ApiError> {
        super::check_name("snapshot", &req.name)?;
        if req.description.len() > viv_api::vms::MAX_VM_DESCRIPTION {
            return Err(ApiError::BadRequest(format!(
                "the description is {} bytes; at most {}",
                req.description.len(),
                viv_api::vms::MAX_VM_DESCRIPTION
            )));
        }
        let (row, _held) = self.lock_vm(vm).await?;
        if self.store.vm_snapshot(&row.id, &req.name)?.is_some() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' has a snapshot named '{}' already",
                row.name, req.name
            )));
        }
        let state = state_of(&row)?;
        let def = definition_of(&row.definition)?;
        let disks = writable_disks(&def);
        if disks.is_empty() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' has no writable disk to hold a snapshot",
                row.name
            )));
        }
        let live = self.vm_runtime.get(&row.id);
        let memory = req.memory.unwrap_or(live.is_some());
        let tag = format!("vmsnap-{}", super::random_id(12));
        match &live {
            Some(live) => {
                if let Some(raw) = self.raw_disk(&disks).await? {
                    return Err(raw_disk(&row.name, &raw));
                }
                if memory {
                    self.check_devices_as_started(&row.name, live).await?;
                }
                live.machine
                    .save_snapshot(&tag, memory)
                    .await
                    .map_err(|e| ApiError::Internal(format!("snapshot of VM '{}': {e}", row.name)))?;
            }
            None if memory => {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' is {}: a snapshot with memory needs it running; take a disk-only snapshot (memory: false)",
                    row.name,
                    state.as_str()
                )))
            }
            None => {
                self.disks_snapshot(&row.name, &disks, &tag, SnapshotAction::Create)
                    .await?
            }
        }
        let snap = VmSnapshotRow {
            id: tag,
            vm_id: row.id.clone(),
            name: req.name,
            parent_id: self.store.vm_current_snapshot(&row.id)?,
            memory,
            vm_state: state.as_str().to_owned(),
            definition: to_json(&def)?,
            description: req.description,
            created_at: String::new(),
        };
        if let Err(err) = self.store.insert_vm_snapshot(&snap) {
            self.drop_snapshot_data(&row, &snap).await;
            return Err(err.into());
        }
        tracing::info!(vm = %row.id, snapshot = %snap.id, name = %snap.name, memory, "VM snapshot taken");
        self.vm_snapshot(&row.id, &snap.id)
    }

    /// Brings a VM back to a snapshot. With memory, a stopped VM is started first and the VM
    /// ends in the state it had when the snapshot was taken; a disk-only snapshot needs the VM
    /// stopped.
    pub async fn revert_vm_snapshot(self: &Arc<Self>, vm: &str, snapshot: &str) -> Result<VmSnapshot, ApiError> {
        let (row, _held) = self.lock_vm(vm).await?;
        let id = row.id.clone();
        let snap = self.snapshot_row(&row, snapshot)?;
        let taken_with = definition_of(&snap.definition)?;
        if snap.memory {
            let next = definition_of(row.pending_definition.as_deref().unwrap_or(&row.definition))?;
            let changed = device_changes(&taken_with, &next)?;
            if !changed.is_empty() {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' changed since snapshot '{}' ({}): a snapshot with memory is reverted only into the devices it was taken with",
                    row.name,
                    snap.name,
                    changed.join(", ")
                )));
            }
            if self.vm_runtime.get(&row.id).is_none() {
                self.start_vm_locked(&row.id).await?;
            }
            let live = self.live_of(&self.vm_row(&id)?)?;
            // The disks change behind the backup bitmaps' back (and QEMU refuses to load a
            // snapshot into disks with bitmaps): they go, and the next backup is full.
            self.forget_backup_bitmaps(&self.vm_row(&id)?).await;
            live.machine
                .load_snapshot(&snap.id)
                .await
                .map_err(|e| ApiError::Internal(format!("reverting VM '{}' to '{}': {e}", row.name, snap.name)))?;
            let now = self.vm_row(&id)?;
            let before = state_of(&now)?;
            let want = if snap.vm_state == VmState::Paused.as_str() {
                VmState::Paused
            } else {
                VmState::Running
            };
            let done = match want {
                VmState::Paused => live.machine.pause().await.map_err(|e| e.to_string()),
                _ => live.machine.resume().await.map_err(|e| e.to_string()),
            };
            done.map_err(|e| ApiError::Internal(format!("VM '{}': {e}", row.name)))?;
            self.vm_transition(
                &row.id,
                &row.name,
                before,
                want,
                Some(format!("reverted to snapshot '{}'", snap.name)),
            )?;
        } else {
            let state = state_of(&row)?;
            if state.is_active() {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' is {}: stop it before reverting to disk-only snapshot '{}'",
                    row.name,
                    state.as_str(),
                    snap.name
                )));
            }
            let disks = writable_disks(&taken_with);
            self.check_not_a_base(&row.name, &disks)?;
            // As above: bitmaps go before the disks change (qemu-img refuses otherwise).
            self.forget_backup_bitmaps(&row).await;
            self.disks_snapshot(&row.name, &disks, &snap.id, SnapshotAction::Apply)
                .await?;
        }
        self.store.set_vm_current_snapshot(&row.id, Some(&snap.id))?;
        tracing::info!(vm = %row.id, snapshot = %snap.id, name = %snap.name, "VM reverted to a snapshot");
        self.vm_snapshot(&row.id, &snap.id)
    }

    /// Deletes a snapshot of a VM; its children move to its parent.
    pub async fn delete_vm_snapshot(self: &Arc<Self>, vm: &str, snapshot: &str) -> Result<(), ApiError> {
        let (row, _held) = self.lock_vm(vm).await?;
        let snap = self.snapshot_row(&row, snapshot)?;
        self.drop_snapshot_data(&row, &snap).await;
        self.store.delete_vm_snapshot(&snap)?;
        tracing::info!(vm = %row.id, snapshot = %snap.id, name = %snap.name, "VM snapshot deleted");
        Ok(())
    }

    /// Removes the VM's snapshots from disks it keeps (its gate held; the VM is not running).
    pub(super) async fn drop_vm_snapshots(&self, row: &VmRow) {
        for snap in self.store.vm_snapshots(&row.id).unwrap_or_default() {
            self.drop_snapshot_data(row, &snap).await;
        }
        let _ = self.store.delete_vm_snapshots(&row.id);
    }

    /// Deletes snapshot `snap`'s data from the disks (through QEMU while the VM runs); a disk
    /// that is gone or lacks it is passed over.
    async fn drop_snapshot_data(&self, row: &VmRow, snap: &VmSnapshotRow) {
        if let Some(live) = self.vm_runtime.get(&row.id) {
            if let Err(err) = live.machine.delete_snapshot(&snap.id).await {
                tracing::warn!(vm = %row.id, snapshot = %snap.id, error = %err, "deleting a snapshot from running disks");
            }
            return;
        }
        let disks = definition_of(&snap.definition)
            .map(|d| writable_disks(&d))
            .unwrap_or_default();
        for disk in disks {
            if let Err(err) = self
                .storage
                .disk_snapshot(&disk, &snap.id, SnapshotAction::Delete)
                .await
            {
                tracing::debug!(vm = %row.id, %disk, snapshot = %snap.id, error = %err, "no snapshot to delete from a disk");
            }
        }
    }

    /// Applies `action` with tag `tag` to each disk; a failed create deletes what it made.
    async fn disks_snapshot(
        &self,
        vm: &str,
        disks: &[String],
        tag: &str,
        action: SnapshotAction,
    ) -> Result<(), ApiError> {
        for (i, disk) in disks.iter().enumerate() {
            if let Err(err) = self.storage.disk_snapshot(disk, tag, action).await {
                if action == SnapshotAction::Create {
                    for done in &disks[..i] {
                        let _ = self.storage.disk_snapshot(done, tag, SnapshotAction::Delete).await;
                    }
                }
                return Err(super::storage::api(err.kind(), format!("VM '{vm}': {err}")));
            }
        }
        Ok(())
    }

    /// The first of `disks` that is not qcow2.
    async fn raw_disk(&self, disks: &[String]) -> Result<Option<String>, ApiError> {
        for disk in disks {
            if let Ok(info) = self.storage.disk_info(disk).await {
                if info.format != viv_storage::DiskFormat::Qcow2 {
                    return Ok(Some(disk.clone()));
                }
            }
        }
        Ok(None)
    }
}

fn raw_disk(vm: &str, disk: &str) -> ApiError {
    ApiError::Conflict(format!(
        "VM '{vm}': disk '{disk}' is raw: snapshots need qcow2 disks (clone it to a qcow2 disk first)"
    ))
}

/// The fields, other than those a running VM takes at once, that differ.
fn device_changes(a: &VmDefinition, b: &VmDefinition) -> Result<Vec<String>, ApiError> {
    let (a, b) = (
        serde_json::to_value(a).map_err(|e| ApiError::Internal(e.to_string()))?,
        serde_json::to_value(b).map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    let empty = serde_json::Map::new();
    let (a, b) = (a.as_object().unwrap_or(&empty), b.as_object().unwrap_or(&empty));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter(|k| !LIVE_FIELDS.contains(&k.as_str()) && k.as_str() != "resources" && a.get(*k) != b.get(*k))
        .cloned()
        .collect())
}

fn snapshot_info(row: &VmSnapshotRow, current: Option<&str>) -> Result<VmSnapshot, ApiError> {
    Ok(VmSnapshot {
        id: row.id.clone(),
        name: row.name.clone(),
        vm_id: row.vm_id.clone(),
        parent_id: row.parent_id.clone(),
        memory: row.memory,
        vm_state: row
            .vm_state
            .parse()
            .map_err(|e: String| ApiError::Internal(format!("snapshot {}: {e}", row.id)))?,
        current: current == Some(row.id.as_str()),
        description: row.description.clone(),
        created_at: row.created_at.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_changes_ignore_what_a_running_vm_takes_at_once() {
        let a = VmDefinition::default();
        let mut b = a.clone();
        b.description = "new".into();
        b.tags = vec!["x".into()];
        assert!(device_changes(&a, &b).unwrap().is_empty());
        b.memory_mib = 1024;
        assert_eq!(device_changes(&a, &b).unwrap(), ["memoryMib"]);
    }
}
