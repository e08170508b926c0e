//! A VM's network cards, one at a time: `POST /vms/{id}/nics`, `PATCH` and `DELETE
//! /vms/{id}/nics/{index}`, applied to a running VM at once where the machine allows:
//! - a NIC added to a running `q35` VM with a free hotplug port becomes a `virtio-net-pci`
//!   device there (on a new tap on its switch's bridge, or on QEMU's user-mode network);
//! - a NIC moved from one switch to another, or given new rate limits or a new firewall, keeps
//!   its tap, which moves to the other bridge and takes the new rules (the guest's link stays up; it is on
//!   the other network at once and asks DHCP again when it wishes);
//! - the last NIC, when it was hot-added, is removed once the guest lets go of it.
//!
//! Anything else on a running VM (a new model or MAC, a move to or from the user-mode network,
//! removing a NIC of its start, a VM without hotplug) waits for its next start in the pending
//! definition, as an edit of the whole VM does, and the answer says which (`atNextStart`).
//!
//! Invariants: under the VM's gate; a change reaches the definition only after QEMU (or the
//! host's network) took it; the definition and the pending one are checked as any edit
//! (switches exist, MACs unique) under the switch-names lock, which is held again, without an
//! await, while they are stored. A running NIC's QEMU id is `nic{index}`, so only the last NIC
//! can go while the VM runs.

use std::sync::Arc;

use serde_json::Value;
use viv_api::vms::{MachineType, NicModel, VmDefinition, VmEdit, VmNic};

use super::vm_hotplug::hotplug_error;
use super::vm_spec::tap_rules;
use super::vms::{check_definition, definition_of, merge_patch, state_of};
use super::Manager;
use crate::error::ApiError;
use viv_vmm::machine::HotplugError;

/// How a change of NICs was applied.
enum Applied {
    /// To the running VM (and its definition).
    Now,
    /// To the pending definition: at the next start.
    AtNextStart,
    /// To the definition of a stopped VM.
    Stopped,
}

impl Manager {
    /// Adds `nic` to VM `id_or_name`: hot-plugged into a running `q35` VM with a free port,
    /// else at its next start.
    pub async fn add_vm_nic(self: &Arc<Self>, id_or_name: &str, nic: VmNic) -> Result<VmEdit, ApiError> {
        let (row, _gate) = self.lock_vm(id_or_name).await?;
        let current = definition_of(&row.definition)?;
        let pending = row.pending_definition.as_deref().map(definition_of).transpose()?;
        let mut latest = pending.clone().unwrap_or_else(|| current.clone());
        latest.nics.push(nic);
        self.fill_macs(&mut latest)?;
        self.check_nics(&row.id, &latest)?;
        let nic = latest.nics.last().cloned().expect("pushed above");
        let live = state_of(&row)?.is_active();
        // Hot-plugged when the running machine can, and the new NIC's index is the same in the
        // running definition as in the pending one.
        let hotplug = live
            && current.machine == MachineType::Q35
            && current.hotplug_ports.unwrap_or(0) > 0
            && nic.model == NicModel::VirtioNet
            && pending.as_ref().is_none_or(|p| p.nics == current.nics);
        let applied = if hotplug {
            let running = self.live_vm(&row.id)?;
            let index = current.nics.len();
            let id = format!("nic{index}");
            let mac = nic.mac.clone().expect("filled above");
            let tap = match &nic.switch {
                Some(switch) => Some(
                    self.switch_tap((&row.id, &row.name), &id, switch, tap_rules(&nic)?)
                        .await?
                        .0,
                ),
                None => None,
            };
            // QEMU keeps its own copy of the tap; ours closes when this returns.
            running
                .machine
                .hot_add_nic(&id, &mac, tap.as_ref())
                .await
                .map_err(|e| hotplug_error(&row.name, &format!("NIC {index}"), e))?;
            tracing::info!(vm = %row.id, nic = index, %mac, switch = ?nic.switch, "NIC hot-added");
            Applied::Now
        } else if live {
            Applied::AtNextStart
        } else {
            Applied::Stopped
        };
        let mut now = current;
        if !matches!(applied, Applied::AtNextStart) {
            now.nics.push(nic);
        }
        self.store_nics(&row.id, now, latest, pending.is_some(), applied)
    }

    /// Applies JSON merge patch `patch` to NIC `index` of VM `id_or_name`: a running VM's NIC
    /// moves to another switch and takes new rate limits at once, the rest at its next start.
    pub async fn edit_vm_nic(
        self: &Arc<Self>,
        id_or_name: &str,
        index: usize,
        patch: Value,
    ) -> Result<VmEdit, ApiError> {
        if !patch.is_object() {
            return Err(ApiError::BadRequest("a NIC edit is a JSON object of NIC fields".into()));
        }
        let (row, _gate) = self.lock_vm(id_or_name).await?;
        let current = definition_of(&row.definition)?;
        let pending = row.pending_definition.as_deref().map(definition_of).transpose()?;
        let mut latest = pending.clone().unwrap_or_else(|| current.clone());
        let Some(old) = latest.nics.get(index) else {
            return Err(no_nic(&row.name, index, latest.nics.len()));
        };
        let mut merged = serde_json::to_value(old).map_err(|e| ApiError::Internal(e.to_string()))?;
        merge_patch(&mut merged, &patch);
        let edited: VmNic =
            serde_json::from_value(merged).map_err(|e| ApiError::BadRequest(format!("invalid NIC: {e}")))?;
        latest.nics[index] = edited.clone();
        self.fill_macs(&mut latest)?;
        self.check_nics(&row.id, &latest)?;
        let edited = latest.nics[index].clone();
        let live = state_of(&row)?.is_active();
        let mut now = current.clone();
        let applied = if !live {
            Applied::Stopped
        } else {
            // What of the edit the running NIC can take: another switch, other limits.
            // (Only while the pending definition numbers the NICs as the running one does.)
            let aligned = pending.as_ref().is_none_or(|p| p.nics.len() == current.nics.len());
            let running_nic = current.nics.get(index).filter(|_| aligned);
            match running_nic {
                Some(running_nic) if running_nic.switch.is_some() && edited.switch.is_some() => {
                    let mut taken = running_nic.clone();
                    taken.switch = edited.switch.clone();
                    taken.rate_in_kbps = edited.rate_in_kbps;
                    taken.rate_out_kbps = edited.rate_out_kbps;
                    taken.firewall = edited.firewall.clone();
                    if taken != *running_nic {
                        let switch = taken.switch.as_deref().expect("checked above");
                        self.retarget_tap((&row.id, &row.name), &format!("nic{index}"), switch, tap_rules(&taken)?)
                            .await?;
                        tracing::info!(vm = %row.id, nic = index, %switch, "NIC moved or limited while the VM runs");
                        now.nics[index] = taken;
                    }
                    if now.nics[index] == edited {
                        Applied::Now
                    } else {
                        Applied::AtNextStart
                    }
                }
                _ => Applied::AtNextStart,
            }
        };
        self.store_nics(&row.id, now, latest, pending.is_some(), applied)
    }

    /// Removes NIC `index` from VM `id_or_name`: at once when the VM runs and it is a hot-added
    /// last NIC, else at its next start.
    pub async fn remove_vm_nic(self: &Arc<Self>, id_or_name: &str, index: usize) -> Result<VmEdit, ApiError> {
        let (row, _gate) = self.lock_vm(id_or_name).await?;
        let current = definition_of(&row.definition)?;
        let pending = row.pending_definition.as_deref().map(definition_of).transpose()?;
        let mut latest = pending.clone().unwrap_or_else(|| current.clone());
        if index >= latest.nics.len() {
            return Err(no_nic(&row.name, index, latest.nics.len()));
        }
        latest.nics.remove(index);
        let live = state_of(&row)?.is_active();
        let mut now = current.clone();
        let applied = if !live {
            Applied::Stopped
        } else if index + 1 == current.nics.len() && pending.as_ref().is_none_or(|p| p.nics == current.nics) {
            let running = self.live_vm(&row.id)?;
            match running.machine.hot_remove_nic(&format!("nic{index}")).await {
                Ok(()) => {
                    tracing::info!(vm = %row.id, nic = index, "NIC hot-removed");
                    now.nics.remove(index);
                    Applied::Now
                }
                // A NIC of the VM's start, on the root bus.
                Err(HotplugError::UnknownDevice(_)) => Applied::AtNextStart,
                Err(e) => return Err(hotplug_error(&row.name, &format!("NIC {index}"), e)),
            }
        } else {
            Applied::AtNextStart
        };
        self.store_nics(&row.id, now, latest, pending.is_some(), applied)
    }

    /// Checks `def`'s NICs and the rest as an edit does (switches exist, MACs unique).
    fn check_nics(&self, id: &str, def: &VmDefinition) -> Result<(), ApiError> {
        let _names = self.switches.names.lock().expect("switch names lock");
        self.check_nic_switches(def)?;
        check_definition(def, &self.store.list_vms()?, Some(id))
    }

    /// Stores the running definition `now` and the latest intent `latest` (pending when it
    /// differs from `now`, or there was a pending one already and the VM runs), and answers.
    fn store_nics(
        &self,
        id: &str,
        now: VmDefinition,
        latest: VmDefinition,
        had_pending: bool,
        applied: Applied,
    ) -> Result<VmEdit, ApiError> {
        let (definition, pending) = match applied {
            Applied::Stopped => (latest, None),
            Applied::Now | Applied::AtNextStart => {
                let pending = (had_pending || latest != now).then_some(latest);
                (now, pending)
            }
        };
        {
            // Checked again, and stored, without an await between: a switch deleted meanwhile
            // cannot be named by what is stored.
            let _names = self.switches.names.lock().expect("switch names lock");
            self.check_nic_switches(&definition)?;
            if let Some(pending) = &pending {
                self.check_nic_switches(pending)?;
            }
            self.store_definitions(id, &definition, pending.as_ref())?;
        }
        let field = || vec!["nics".to_owned()];
        Ok(VmEdit {
            vm: self.vm_info(id)?,
            applied_now: if matches!(applied, Applied::Now | Applied::Stopped) {
                field()
            } else {
                Vec::new()
            },
            at_next_start: if matches!(applied, Applied::AtNextStart) {
                field()
            } else {
                Vec::new()
            },
        })
    }
}

fn no_nic(vm: &str, index: usize, count: usize) -> ApiError {
    ApiError::NotFound(format!(
        "VM '{vm}' has no NIC {index} (it has {count}, numbered from 0 as `viv vm get` lists them)"
    ))
}
