//! A VM's removable media and firmware variables: the medium in a CD-ROM drive, changed or
//! ejected while the VM runs or not, and the UEFI variable store (NVRAM) reset to Debian's
//! template.
//!
//! Invariants: a medium change is recorded in the VM's definition (and pending definition), so
//! the VM starts with the medium it last had; a running VM's drive changes first, and the
//! definition only once QEMU took the change; the NVRAM is reset only while no QEMU runs.

use std::sync::Arc;

use viv_api::vms::{Firmware, VmInfo};

use super::vms::{definition_of, state_of, to_json};
use super::Manager;
use crate::error::ApiError;
use crate::store::VmRow;

impl Manager {
    /// Puts ISO `iso` of the library into CD-ROM drive `drive` (its index) of a VM, or ejects
    /// the medium when `iso` is `None`.
    pub async fn change_vm_medium(
        self: &Arc<Self>,
        vm: &str,
        drive: usize,
        iso: Option<&str>,
    ) -> Result<VmInfo, ApiError> {
        if let Some(iso) = iso {
            super::vms::check_pool_name("ISO", iso)?;
        }
        let (row, _held) = self.lock_vm(vm).await?;
        let def = definition_of(&row.definition)?;
        if drive >= def.cdroms.len() {
            return Err(ApiError::NotFound(format!(
                "VM '{}' has {} CD-ROM drive(s); there is no drive {drive}",
                row.name,
                def.cdroms.len()
            )));
        }
        let path = match iso {
            Some(iso) => Some(self.iso_path(&row.name, iso).await?),
            None => None,
        };
        if let Some(live) = self.vm_runtime.get(&row.id) {
            let device = format!("cd{drive}");
            let changed = match &path {
                Some(path) => live
                    .machine
                    .change_medium(&device, path)
                    .await
                    .map_err(|e| e.to_string()),
                None => live.machine.eject(&device).await.map_err(|e| e.to_string()),
            };
            changed.map_err(|e| ApiError::Conflict(format!("VM '{}' drive {drive}: {e}", row.name)))?;
        }
        self.store_media(&row, &[(drive, iso)])?;
        let state = state_of(&row)?;
        let what = match iso {
            Some(iso) => format!("drive {drive}: ISO '{iso}' inserted"),
            None => format!("drive {drive}: medium ejected"),
        };
        self.publish_vm(&row.id, &row.name, state, state, Some(what));
        self.vm_info(&row.id)
    }

    /// Records new media in a VM's definition and pending definition: drive index → the ISO it
    /// holds (`None`: empty). A changed drive loses its "eject after first boot" mark.
    pub(super) fn store_media(&self, row: &VmRow, media: &[(usize, Option<&str>)]) -> Result<(), ApiError> {
        let set = |json: &str| -> Result<String, ApiError> {
            let mut def = definition_of(json)?;
            for &(drive, iso) in media {
                if let Some(cd) = def.cdroms.get_mut(drive) {
                    cd.iso = iso.map(str::to_owned);
                    cd.eject_after_first_boot = false;
                }
            }
            to_json(&def)
        };
        let now = set(&row.definition)?;
        let pending = row.pending_definition.as_deref().map(set).transpose()?;
        self.store.update_vm_definition(&row.id, &now, pending.as_deref())?;
        Ok(())
    }

    /// Replaces a stopped UEFI VM's variable store with a fresh copy of the firmware's template
    /// (boot entries and every other variable are forgotten).
    pub async fn reset_vm_nvram(self: &Arc<Self>, vm: &str) -> Result<VmInfo, ApiError> {
        let (row, _held) = self.lock_vm(vm).await?;
        let state = state_of(&row)?;
        if state.is_active() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is {}: stop it before resetting its NVRAM",
                row.name,
                state.as_str()
            )));
        }
        if definition_of(&row.definition)?.firmware != Firmware::Uefi {
            return Err(ApiError::Conflict(format!(
                "VM '{}' boots with SeaBIOS, which has no NVRAM",
                row.name
            )));
        }
        std::fs::create_dir_all(self.vm_dir(&row.id))
            .map_err(|e| ApiError::Internal(format!("creating the VM's directory: {e}")))?;
        self.vm_ovmf(&row.id)
            .reset_nvram()
            .map_err(|e| super::vm_spec::launch_error(&row.name, e))?;
        tracing::info!(vm = %row.id, name = %row.name, "NVRAM reset");
        self.vm_info(&row.id)
    }
}
