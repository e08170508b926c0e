//! Disks attached to and detached from VMs, while they run when they can be: `POST
//! /vms/{id}/disks` and `DELETE /vms/{id}/disks/{disk}`; and vCPUs, `PUT /vms/{id}/vcpus`:
//! added to a running VM up to its `maxVcpus`, set freely on a stopped one; and the memory a
//! running VM's guest keeps, through its balloon: `GET`/`PUT /vms/{id}/memory`.
//!
//! A stopped VM's definition simply changes. A running `q35` VM started with hotplug ports
//! (`hotplugPorts`, 4 for VMs defined since) gets the disk at once as a virtio-blk device on a
//! free PCIe root port, and its definition changes with it, so the disk is there at the next
//! start too. A disk is detached live only if it was hot-added (disks attached at start sit on
//! the root bus, which has no hotplug) and is the VM's last one (QEMU's device ids follow the
//! definition's order until the next start).
//!
//! Invariants: the definition changes only after QEMU accepted the change, under the VM's
//! gate; a pending definition (edits waiting for the next start) gets the same change; the
//! usual checks of a definition (the disk exists, is not attached read-write elsewhere) apply.

use std::sync::Arc;

use viv_api::vms::{DiskBus, MachineType, VmDisk, VmEdit};
use viv_vmm::machine::{self, HotDisk, HotplugError};

use super::vms::{check_definition, definition_of, state_of, to_json};
use super::Manager;
use crate::error::ApiError;

/// Hotplug ports a VM defined without `hotplugPorts` gets.
pub(super) const DEFAULT_HOTPLUG_PORTS: u8 = 4;

/// The least memory a balloon may leave a guest.
const MIN_BALLOON_TARGET_MIB: u32 = 64;

/// Most hotplug ports a VM may ask for.
pub(super) const MAX_HOTPLUG_PORTS: u8 = 16;

impl Manager {
    /// Attaches pool disk `disk` to VM `id_or_name`: at once when the VM runs (q35 with a free
    /// hotplug port), else at its next start.
    pub async fn attach_vm_disk(self: &Arc<Self>, id_or_name: &str, disk: VmDisk) -> Result<VmEdit, ApiError> {
        let (row, _gate) = self.lock_vm(id_or_name).await?;
        let current = definition_of(&row.definition)?;
        if current.disks.iter().any(|d| d.disk == disk.disk) {
            return Err(ApiError::Conflict(format!(
                "disk '{}' is already attached to VM '{}'",
                disk.disk, row.name
            )));
        }
        let mut wanted = current.clone();
        wanted.disks.push(disk.clone());
        let others = self.store.list_vms()?;
        check_definition(&wanted, &others, Some(&row.id))?;
        let pending = match &row.pending_definition {
            Some(json) => {
                let mut pending = definition_of(json)?;
                if !pending.disks.iter().any(|d| d.disk == disk.disk) {
                    pending.disks.push(disk.clone());
                }
                Some(pending)
            }
            None => None,
        };
        let live = state_of(&row)?.is_active();
        if live {
            if current.machine != MachineType::Q35 || current.hotplug_ports.unwrap_or(0) == 0 {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' cannot take disks while it runs ({}): stop it, or attach the disk to a q35 VM with hotplug ports",
                    row.name,
                    if current.machine == MachineType::Q35 {
                        "it was defined without hotplug ports"
                    } else {
                        "only q35 machines have hotplug"
                    }
                )));
            }
            if disk.bus != DiskBus::VirtioBlk {
                return Err(ApiError::BadRequest(format!(
                    "a disk added while the VM runs is a virtio-blk device, not {:?}",
                    disk.bus
                )));
            }
            let running = self.live_vm(&row.id)?;
            let info = self
                .storage
                .disk_info(&disk.disk)
                .await
                .map_err(|e| super::storage::api(e.kind(), format!("disk '{}': {e}", disk.disk)))?;
            let hot = HotDisk {
                id: format!("disk{}", current.disks.len()),
                path: info.path,
                format: match info.format {
                    viv_storage::DiskFormat::Qcow2 => machine::DiskFormat::Qcow2,
                    viv_storage::DiskFormat::Raw => machine::DiskFormat::Raw,
                },
                read_only: disk.read_only,
            };
            running
                .machine
                .hot_add_disk(&hot)
                .await
                .map_err(|e| hotplug_error(&row.name, &format!("disk '{}'", disk.disk), e))?;
            tracing::info!(vm = %row.id, disk = %disk.disk, device = %hot.id, "disk hot-added");
        }
        self.store_definitions(&row.id, &wanted, pending.as_ref())?;
        Ok(VmEdit {
            vm: self.vm_info(&row.id)?,
            applied_now: if live { vec!["disks".into()] } else { Vec::new() },
            at_next_start: Vec::new(),
        })
    }

    /// Detaches disk `disk` from VM `id_or_name` (the disk stays in the pool): at once when it
    /// was hot-added to the running VM and is its last disk, else only from a stopped VM.
    pub async fn detach_vm_disk(self: &Arc<Self>, id_or_name: &str, disk: &str) -> Result<VmEdit, ApiError> {
        let (row, _gate) = self.lock_vm(id_or_name).await?;
        let current = definition_of(&row.definition)?;
        let Some(position) = current.disks.iter().position(|d| d.disk == disk) else {
            return Err(ApiError::NotFound(format!(
                "disk '{disk}' is not attached to VM '{}'",
                row.name
            )));
        };
        let mut wanted = current.clone();
        wanted.disks.remove(position);
        let pending = match &row.pending_definition {
            Some(json) => {
                let mut pending = definition_of(json)?;
                pending.disks.retain(|d| d.disk != disk);
                Some(pending)
            }
            None => None,
        };
        let live = state_of(&row)?.is_active();
        if live {
            if position + 1 != current.disks.len() {
                return Err(ApiError::Conflict(format!(
                    "disk '{disk}' is not VM '{}''s last disk: while it runs, only the last disk can be detached (stop the VM to detach this one)",
                    row.name
                )));
            }
            let running = self.live_vm(&row.id)?;
            running
                .machine
                .hot_remove_disk(&format!("disk{position}"))
                .await
                .map_err(|e| hotplug_error(&row.name, &format!("disk '{disk}'"), e))?;
            tracing::info!(vm = %row.id, %disk, "disk hot-removed");
        }
        self.store_definitions(&row.id, &wanted, pending.as_ref())?;
        Ok(VmEdit {
            vm: self.vm_info(&row.id)?,
            applied_now: if live { vec!["disks".into()] } else { Vec::new() },
            at_next_start: Vec::new(),
        })
    }

    /// Sets VM `id_or_name`'s vCPUs: a running VM gets more at once (up to its `maxVcpus`; the
    /// guest brings them online), a stopped one any count at its next start.
    pub async fn set_vm_vcpus(self: &Arc<Self>, id_or_name: &str, count: u32) -> Result<VmEdit, ApiError> {
        let (row, _gate) = self.lock_vm(id_or_name).await?;
        let current = definition_of(&row.definition)?;
        let mut wanted = current.clone();
        wanted.cpu = viv_api::vms::CpuTopology {
            sockets: count,
            cores: 1,
            threads: 1,
        };
        let others = self.store.list_vms()?;
        check_definition(&wanted, &others, Some(&row.id))?;
        let pending = match &row.pending_definition {
            Some(json) => {
                let mut pending = definition_of(json)?;
                pending.cpu = wanted.cpu;
                Some(pending)
            }
            None => None,
        };
        let live = state_of(&row)?.is_active();
        if live && count != current.cpu.vcpus() {
            if current.max_vcpus.is_none_or(|max| max <= current.cpu.vcpus())
                || current.cpu.cores != 1
                || current.cpu.threads != 1
            {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' was started without room for more vCPUs (set maxVcpus, with cores and threads 1, and restart it), or stop it to change them",
                    row.name
                )));
            }
            let running = self.live_vm(&row.id)?;
            running.machine.set_vcpus(count).await.map_err(|e| match e {
                HotplugError::Vcpus(m) => ApiError::Conflict(format!("VM '{}': {m}", row.name)),
                other => ApiError::Sandbox(format!("VM '{}': {other}", row.name)),
            })?;
            tracing::info!(vm = %row.id, vcpus = count, "vCPUs hot-added");
        }
        self.store_definitions(&row.id, &wanted, pending.as_ref())?;
        Ok(VmEdit {
            vm: self.vm_info(&row.id)?,
            applied_now: if live { vec!["cpu".into()] } else { Vec::new() },
            at_next_start: Vec::new(),
        })
    }

    /// A running VM's memory as its balloon has it.
    pub async fn vm_memory(&self, id_or_name: &str) -> Result<viv_api::vms::VmMemory, ApiError> {
        let (running, def) = self.ballooned_vm(id_or_name)?;
        let actual_mib = running
            .machine
            .balloon_mib()
            .await
            .map_err(|e| ApiError::Sandbox(format!("reading the balloon: {e}")))?;
        Ok(viv_api::vms::VmMemory {
            memory_mib: def.memory_mib,
            actual_mib,
        })
    }

    /// Asks a running VM's balloon to leave its guest `target_mib` (64 MiB to its `memoryMib`);
    /// the guest gets there over the next moments, and back up likewise. Not kept across a
    /// restart: a VM starts with all its memory.
    pub async fn set_vm_memory(&self, id_or_name: &str, target_mib: u32) -> Result<viv_api::vms::VmMemory, ApiError> {
        let (running, def) = self.ballooned_vm(id_or_name)?;
        if !(MIN_BALLOON_TARGET_MIB..=def.memory_mib).contains(&target_mib) {
            return Err(ApiError::BadRequest(format!(
                "targetMib must be between {MIN_BALLOON_TARGET_MIB} and the VM's memoryMib ({}), got {target_mib}",
                def.memory_mib
            )));
        }
        running
            .machine
            .set_balloon(target_mib)
            .await
            .map_err(|e| ApiError::Sandbox(format!("setting the balloon: {e}")))?;
        tracing::info!(vm = %running.id, target_mib, "balloon target set");
        self.vm_memory(&running.id).await
    }

    /// A running VM with a balloon, and its running definition.
    fn ballooned_vm(
        &self,
        id_or_name: &str,
    ) -> Result<(Arc<super::vm_runtime::LiveVm>, viv_api::vms::VmDefinition), ApiError> {
        let row = self.vm_row(id_or_name)?;
        let def = definition_of(&row.definition)?;
        let running = self.live_vm(&row.id)?;
        if !(def.balloon.unwrap_or(false) && def.machine == MachineType::Q35) {
            return Err(ApiError::Conflict(format!(
                "VM '{}' has no balloon device (q35 VMs defined with `balloon: true`, the default for new ones, have one from their next start)",
                row.name
            )));
        }
        Ok((running, def))
    }

    /// 409 when disks or vCPUs were added to running VM `name` since it started: a saved state
    /// of it (a fork, a snapshot with memory, a migration) loads only into a machine with the
    /// same devices, which its definition (the added disks and vCPUs as boot devices) does not
    /// describe. A restart makes them boot devices.
    pub(super) async fn check_devices_as_started(
        &self,
        name: &str,
        live: &super::vm_runtime::LiveVm,
    ) -> Result<(), ApiError> {
        let devices = live.machine.hot_added_devices().await.unwrap_or(0);
        let vcpus = live.machine.hot_added_vcpus().await.unwrap_or(0);
        if devices + vcpus > 0 {
            return Err(ApiError::Conflict(format!(
                "VM '{name}' had {devices} disk(s) or NIC(s) and {vcpus} vCPU(s) added while it runs, and its saved state would only load into a machine started that way: restart it first"
            )));
        }
        Ok(())
    }

    pub(super) fn store_definitions(
        &self,
        id: &str,
        definition: &viv_api::vms::VmDefinition,
        pending: Option<&viv_api::vms::VmDefinition>,
    ) -> Result<(), ApiError> {
        let pending = pending.map(to_json).transpose()?;
        if !self
            .store
            .update_vm_definition(id, &to_json(definition)?, pending.as_deref())?
        {
            return Err(ApiError::NotFound(format!("no VM '{id}'")));
        }
        Ok(())
    }
}

/// The API's answer to a hotplug of `what` (`disk 'NAME'`, `NIC N`) that failed.
pub(super) fn hotplug_error(vm: &str, what: &str, err: HotplugError) -> ApiError {
    match err {
        HotplugError::NoFreePort(_) | HotplugError::NotReleased(..) => {
            ApiError::Conflict(format!("VM '{vm}', {what}: {err}"))
        }
        HotplugError::UnknownDisk(_) | HotplugError::UnknownDevice(_) => ApiError::Conflict(format!(
            "{what} was attached at VM '{vm}''s start, on a bus without hotplug: stop the VM to remove it"
        )),
        HotplugError::Image(_) | HotplugError::Vcpus(_) => ApiError::Conflict(format!("VM '{vm}', {what}: {err}")),
        HotplugError::Qmp(_) => ApiError::Sandbox(format!("VM '{vm}', {what}: {err}")),
    }
}
