//! Clones of stopped VMs: a new VM with the source's definition, new MAC addresses, its own
//! SMBIOS UUID (derived from its id), and its own copies of the source's writable disks: linked
//! (a qcow2 overlay on the source's disk, made at once) or full (a copy).
//!
//! Invariants:
//! - a disk that backs linked clones never changes: a VM does not start while one of its
//!   writable disks has linked clones, nor is it reverted to a disk-only snapshot (Proxmox's
//!   "template" rule; delete the clones, or make full clones, to use the source again);
//! - read-only and shareable disks are attached to the clone as they are, not copied;
//! - a clone that fails leaves nothing: disks made for it are deleted, no VM is defined.

use std::sync::Arc;

use viv_api::vms::{NewVm, VmClone, VmInfo};

use super::vms::{definition_of, state_of};
use super::Manager;
use crate::error::ApiError;

impl Manager {
    /// Clones a VM that is not running into a new VM named `req.name`.
    pub async fn clone_vm(self: &Arc<Self>, source: &str, req: VmClone) -> Result<VmInfo, ApiError> {
        super::check_name("VM", &req.name)?;
        let (row, _held) = self.lock_vm(source).await?;
        let state = state_of(&row)?;
        if state.is_active() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is {}: stop it before cloning it",
                row.name,
                state.as_str()
            )));
        }
        if self.store.vm(&req.name)?.is_some() {
            return Err(ApiError::Conflict(format!("a VM named '{}' already exists", req.name)));
        }
        let mut def = definition_of(row.pending_definition.as_deref().unwrap_or(&row.definition))?;
        let mut made: Vec<String> = Vec::new();
        let mut outcome = Ok(());
        for (i, disk) in def.disks.iter_mut().enumerate() {
            if disk.read_only || disk.shareable {
                continue;
            }
            let name = format!("{}-disk{i}", req.name);
            if viv_storage::name::check(&name).is_err() {
                outcome = Err(ApiError::BadRequest(format!(
                    "the clone's disks are named '{name}', which is not a valid disk name (at most 64 characters): choose a shorter VM name"
                )));
                break;
            }
            let cloned = if req.linked {
                self.storage.linked_clone(&disk.disk, &name).await
            } else {
                self.storage.full_clone(&disk.disk, &name, &mut |_| {}).await
            };
            match cloned {
                Ok(_) => {
                    made.push(name.clone());
                    disk.disk = name;
                }
                Err(err) => {
                    outcome = Err(super::storage::api(
                        err.kind(),
                        format!("cloning disk '{}' of VM '{}': {err}", disk.disk, row.name),
                    ));
                    break;
                }
            }
        }
        for nic in &mut def.nics {
            nic.mac = None;
        }
        def.autostart.enabled = false;
        let created = match outcome {
            Ok(()) => self.create_vm(NewVm::new(req.name.clone(), def)),
            Err(err) => Err(err),
        };
        if created.is_err() {
            for disk in made.iter().rev() {
                let _ = self.storage.delete_disk(disk, viv_storage::unused).await;
            }
        } else {
            tracing::info!(source = %row.id, clone = %req.name, linked = req.linked, disks = made.len(), "VM cloned");
        }
        created
    }

    /// Refuses to let VM `vm` write disks that back linked clones.
    pub(super) fn check_not_a_base(&self, vm: &str, disks: &[String]) -> Result<(), ApiError> {
        for disk in disks {
            let children = self
                .storage
                .disk_children(disk)
                .map_err(|e| ApiError::Internal(format!("reading the pool: {e}")))?;
            if !children.is_empty() {
                return Err(ApiError::Conflict(format!(
                    "disk '{disk}' of VM '{vm}' backs linked clones ({}), so it must not change: delete them, or clone with --full",
                    children.join(", ")
                )));
            }
        }
        Ok(())
    }
}
