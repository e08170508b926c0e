//! The VM manager's definitions: create, list, get, edit, rename and delete long-lived VMs.
//!
//! Invariants:
//! - a stored definition has passed [`check_definition`] as a whole: its shape fits this host,
//!   its devices do not conflict with each other or with another VM's (a disk attached
//!   read-write to two VMs, a MAC address used twice), every name in it is a valid name;
//! - every NIC of a stored definition has a MAC address (generated at create when absent), so a
//!   VM keeps its MAC across starts, edits and server restarts;
//! - an edit of an active VM changes at once only the fields that need no restart
//!   ([`LIVE_FIELDS`]); the others wait in the pending definition, which replaces the
//!   definition at the VM's next start;
//! - a VM is deleted only when no QEMU runs for it.

use std::collections::HashSet;

use viv_api::vms::{
    DiskBus, Display, Firmware, MachineType, NewVm, NicModel, VmDefinition, VmEdit, VmInfo, VmState,
    MAX_VM_DESCRIPTION, MAX_VM_DEVICES, MAX_VM_SERIAL_PORTS, MAX_VM_STOP_TIMEOUT_SECS, MAX_VM_TAGS, MAX_VM_TAG_LEN,
};

use super::Manager;
use crate::error::ApiError;
use crate::store::VmRow;

/// Top-level definition fields an edit applies to a running VM at once.
pub(super) const LIVE_FIELDS: &[&str] = &["description", "tags", "autostart", "restartPolicy", "stopTimeoutSecs"];

/// Largest CPU weight cgroups take.
const MAX_CPU_WEIGHT: u32 = 10_000;

impl Manager {
    /// Creates a VM in state `defined`.
    pub fn create_vm(&self, req: NewVm) -> Result<VmInfo, ApiError> {
        super::check_name("VM", &req.name)?;
        let mut definition = req.definition;
        if definition.machine == viv_api::vms::MachineType::Q35 {
            if definition.hotplug_ports.is_none() {
                definition.hotplug_ports = Some(super::vm_hotplug::DEFAULT_HOTPLUG_PORTS);
            }
            definition.balloon.get_or_insert(true);
        }
        self.fill_macs(&mut definition)?;
        let _names = self.switches.names.lock().expect("switch names lock");
        self.check_nic_switches(&definition)?;
        let others = self.store.list_vms()?;
        check_definition(&definition, &others, None)?;
        let id = format!("vm-{}", super::random_id(16));
        let json = to_json(&definition)?;
        if !self.store.insert_vm(&id, &req.name, &json, VmState::Defined.as_str())? {
            return Err(ApiError::Conflict(format!("a VM named '{}' already exists", req.name)));
        }
        tracing::info!(vm = %id, name = %req.name, "VM defined");
        self.vm_info(&id)
    }

    /// Every VM, by name.
    pub fn list_vms(&self) -> Result<Vec<VmInfo>, ApiError> {
        self.store.list_vms()?.into_iter().map(|row| info_of(&row)).collect()
    }

    /// A VM by id or name.
    pub fn vm_info(&self, id_or_name: &str) -> Result<VmInfo, ApiError> {
        info_of(&self.vm_row(id_or_name)?)
    }

    pub(super) fn vm_row(&self, id_or_name: &str) -> Result<VmRow, ApiError> {
        self.store
            .vm(id_or_name)?
            .ok_or_else(|| ApiError::NotFound(format!("no VM '{id_or_name}'")))
    }

    /// Applies a JSON merge patch (RFC 7396) to a VM's definition. An active VM takes the
    /// [`LIVE_FIELDS`] at once and the rest at its next start.
    pub fn edit_vm(&self, id_or_name: &str, patch: serde_json::Value) -> Result<VmEdit, ApiError> {
        if !patch.is_object() {
            return Err(ApiError::BadRequest(
                "an edit is a JSON object of definition fields".into(),
            ));
        }
        let row = self.vm_row(id_or_name)?;
        let current = definition_of(&row.definition)?;
        let state = state_of(&row)?;
        // The latest intent: the pending definition if there is one.
        let base = match &row.pending_definition {
            Some(pending) => definition_of(pending)?,
            None => current.clone(),
        };
        let mut merged = serde_json::to_value(&base).map_err(internal)?;
        merge_patch(&mut merged, &patch);
        let mut wanted: VmDefinition =
            serde_json::from_value(merged).map_err(|e| ApiError::BadRequest(format!("invalid VM definition: {e}")))?;
        self.fill_macs(&mut wanted)?;
        let _names = self.switches.names.lock().expect("switch names lock");
        self.check_nic_switches(&wanted)?;
        let others = self.store.list_vms()?;
        check_definition(&wanted, &others, Some(&row.id))?;
        let changed = changed_fields(&current, &wanted)?;
        let (applied_now, at_next_start): (Vec<String>, Vec<String>) = if state.is_active() {
            changed.into_iter().partition(|f| LIVE_FIELDS.contains(&f.as_str()))
        } else {
            (changed, Vec::new())
        };
        let (definition, pending) = if at_next_start.is_empty() {
            (wanted, None)
        } else {
            // Live fields now; the whole wanted definition at the next start.
            let mut now = serde_json::to_value(&current).map_err(internal)?;
            let wanted_json = serde_json::to_value(&wanted).map_err(internal)?;
            for field in &applied_now {
                now[field.as_str()] = wanted_json[field.as_str()].clone();
            }
            let now: VmDefinition = serde_json::from_value(now).map_err(internal)?;
            (now, Some(wanted))
        };
        let pending_json = pending.as_ref().map(to_json).transpose()?;
        if !self
            .store
            .update_vm_definition(&row.id, &to_json(&definition)?, pending_json.as_deref())?
        {
            return Err(ApiError::NotFound(format!("no VM '{id_or_name}'")));
        }
        Ok(VmEdit {
            vm: self.vm_info(&row.id)?,
            applied_now,
            at_next_start,
        })
    }

    /// Renames a VM.
    pub fn rename_vm(&self, id_or_name: &str, name: &str) -> Result<VmInfo, ApiError> {
        super::check_name("VM", name)?;
        let row = self.vm_row(id_or_name)?;
        match self.store.rename_vm(&row.id, name)? {
            None => Err(ApiError::NotFound(format!("no VM '{id_or_name}'"))),
            Some(false) => Err(ApiError::Conflict(format!("a VM named '{name}' already exists"))),
            Some(true) => self.vm_info(&row.id),
        }
    }

    /// Deletes the row of a VM that is not running (its gate held).
    pub(super) fn delete_vm_row(&self, row: &VmRow) -> Result<(), ApiError> {
        let state = state_of(row)?;
        if state.is_active() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is {}: stop or kill it before deleting it",
                row.name,
                state.as_str()
            )));
        }
        self.store.delete_vm(&row.id)?;
        self.remove_vm_console(&row.id);
        self.remove_cloud_init_seed(&row.id);
        tracing::info!(vm = %row.id, name = %row.name, "VM deleted");
        Ok(())
    }
}

fn internal(e: serde_json::Error) -> ApiError {
    ApiError::Internal(format!("VM definition: {e}"))
}

pub(super) fn to_json(definition: &VmDefinition) -> Result<String, ApiError> {
    serde_json::to_string(definition).map_err(internal)
}

pub(super) fn definition_of(json: &str) -> Result<VmDefinition, ApiError> {
    serde_json::from_str(json).map_err(internal)
}

pub(super) fn state_of(row: &VmRow) -> Result<VmState, ApiError> {
    row.state
        .parse()
        .map_err(|e: String| ApiError::Internal(format!("VM {}: {e}", row.id)))
}

fn info_of(row: &VmRow) -> Result<VmInfo, ApiError> {
    Ok(VmInfo {
        id: row.id.clone(),
        name: row.name.clone(),
        state: state_of(row)?,
        definition: definition_of(&row.definition)?,
        pending_definition: row.pending_definition.as_deref().map(definition_of).transpose()?,
        created_at: row.created_at.clone(),
        state_changed_at: row.state_changed_at.clone(),
        uuid: super::vm_spec::vm_uuid(&row.id),
        pid: row.process.map(|p| p.pid),
        started_at: row.started_at.clone(),
        starts: row.starts,
        last_exit: row.last_exit.clone(),
    })
}

/// The names of a definition's writable disks, in order.
pub(super) fn writable_disks(def: &VmDefinition) -> Vec<String> {
    def.disks
        .iter()
        .filter(|d| !d.read_only)
        .map(|d| d.disk.clone())
        .collect()
}

/// RFC 7396: objects merge key by key, `null` removes a key, anything else replaces.
pub(super) fn merge_patch(target: &mut serde_json::Value, patch: &serde_json::Value) {
    let Some(fields) = patch.as_object() else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = serde_json::Value::Object(Default::default());
    }
    let object = target.as_object_mut().expect("made an object above");
    for (key, value) in fields {
        if value.is_null() {
            object.remove(key);
        } else {
            merge_patch(object.entry(key.clone()).or_insert(serde_json::Value::Null), value);
        }
    }
}

/// Top-level fields whose values differ, as the API names them.
fn changed_fields(before: &VmDefinition, after: &VmDefinition) -> Result<Vec<String>, ApiError> {
    let (before, after) = (
        serde_json::to_value(before).map_err(internal)?,
        serde_json::to_value(after).map_err(internal)?,
    );
    let empty = serde_json::Map::new();
    let (b, a) = (
        before.as_object().unwrap_or(&empty),
        after.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = b.keys().chain(a.keys()).collect();
    keys.sort();
    keys.dedup();
    Ok(keys.into_iter().filter(|k| b.get(*k) != a.get(*k)).cloned().collect())
}

impl Manager {
    /// Gives every NIC of `def` without a MAC one from the server's MAC prefix that no VM
    /// (nor another NIC of `def`) has.
    pub(super) fn fill_macs(&self, def: &mut VmDefinition) -> Result<(), ApiError> {
        if def.nics.iter().all(|n| n.mac.is_some()) {
            return Ok(());
        }
        let mut taken: HashSet<String> = HashSet::new();
        for row in self.store.list_vms()? {
            for text in std::iter::once(&row.definition).chain(row.pending_definition.as_ref()) {
                if let Ok(theirs) = definition_of(text) {
                    taken.extend(
                        theirs
                            .nics
                            .iter()
                            .filter_map(|n| n.mac.as_deref().map(str::to_ascii_lowercase)),
                    );
                }
            }
        }
        taken.extend(
            def.nics
                .iter()
                .filter_map(|n| n.mac.as_deref().map(str::to_ascii_lowercase)),
        );
        for nic in def.nics.iter_mut().filter(|n| n.mac.is_none()) {
            let mac = (0..64)
                .map(|_| mac_with_prefix(&self.config.mac_prefix))
                .find(|m| !taken.contains(m))
                .ok_or_else(|| ApiError::NoRoom("no free MAC address found under the server's --mac-prefix".into()))?;
            taken.insert(mac.clone());
            nic.mac = Some(mac);
        }
        Ok(())
    }
}

/// A random MAC address under `prefix` (three pairs, `52:54:00` by default).
pub(super) fn mac_with_prefix(prefix: &str) -> String {
    let [a, b, c] = rand::random::<[u8; 3]>();
    format!("{}:{a:02x}:{b:02x}:{c:02x}", prefix.to_ascii_lowercase())
}

/// Whether `prefix` is a valid MAC prefix: three hex pairs, a unicast first byte.
pub fn valid_mac_prefix(prefix: &str) -> bool {
    valid_mac(&format!("{prefix}:00:00:00"))
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
        && u8::from_str_radix(parts[0], 16).is_ok_and(|first| first & 1 == 0)
}

/// Checks a definition as a whole: 400 for values out of range, 409 for devices that conflict
/// (within the VM, or with another VM than `this_vm`).
pub(super) fn check_definition(def: &VmDefinition, vms: &[VmRow], this_vm: Option<&str>) -> Result<(), ApiError> {
    let host = crate::capacity::HostLimits::host();
    if let Some(ports) = def.hotplug_ports.filter(|p| *p > 0) {
        if def.machine != viv_api::vms::MachineType::Q35 {
            return Err(ApiError::BadRequest(
                "hotplugPorts needs machine q35 (microvm has no PCIe)".into(),
            ));
        }
        if ports > super::vm_hotplug::MAX_HOTPLUG_PORTS {
            return Err(ApiError::BadRequest(format!(
                "hotplugPorts is at most {}, got {ports}",
                super::vm_hotplug::MAX_HOTPLUG_PORTS
            )));
        }
    }
    let cpu = def.cpu;
    if let Some(max) = def.max_vcpus {
        if def.machine != viv_api::vms::MachineType::Q35 || cpu.cores != 1 || cpu.threads != 1 {
            return Err(ApiError::BadRequest(
                "maxVcpus needs machine q35 and cpu cores 1, threads 1 (each vCPU added while the VM runs is a socket)"
                    .into(),
            ));
        }
        if max < cpu.vcpus() || max > host.max_vcpus {
            return Err(ApiError::BadRequest(format!(
                "maxVcpus must be between the VM's vCPUs ({}) and the host's CPUs ({}), got {max}",
                cpu.vcpus(),
                host.max_vcpus
            )));
        }
    }
    if cpu.sockets == 0 || cpu.cores == 0 || cpu.threads == 0 {
        return Err(ApiError::BadRequest(format!(
            "cpu sockets, cores and threads must each be at least 1, got {}/{}/{}",
            cpu.sockets, cpu.cores, cpu.threads
        )));
    }
    if !(1..=host.max_vcpus).contains(&cpu.vcpus()) {
        return Err(ApiError::BadRequest(format!(
            "a VM may have 1 to {} vCPUs (the CPUs of this host); sockets × cores × threads = {}",
            host.max_vcpus,
            cpu.vcpus()
        )));
    }
    if !(viv_api::MIN_MEMORY_MIB..=host.max_memory_mib).contains(&def.memory_mib) {
        return Err(ApiError::BadRequest(format!(
            "memoryMib must be between {} and {} (what this host can give one VM), got {}",
            viv_api::MIN_MEMORY_MIB,
            host.max_memory_mib,
            def.memory_mib
        )));
    }
    for (what, n) in [
        ("disks", def.disks.len()),
        ("cdroms", def.cdroms.len()),
        ("nics", def.nics.len()),
    ] {
        if n > MAX_VM_DEVICES {
            return Err(ApiError::BadRequest(format!(
                "a VM has at most {MAX_VM_DEVICES} {what}, got {n}"
            )));
        }
    }
    if def.serial_ports != MAX_VM_SERIAL_PORTS {
        return Err(ApiError::BadRequest(format!(
            "a VM has exactly {MAX_VM_SERIAL_PORTS} serial port (its console) for now, got serialPorts {}",
            def.serial_ports
        )));
    }
    if !(1..=MAX_VM_STOP_TIMEOUT_SECS).contains(&def.stop_timeout_secs) {
        return Err(ApiError::BadRequest(format!(
            "stopTimeoutSecs must be between 1 and {MAX_VM_STOP_TIMEOUT_SECS}, got {}",
            def.stop_timeout_secs
        )));
    }
    let mut seen_boot = HashSet::new();
    for device in &def.boot_order {
        if !seen_boot.insert(*device) {
            return Err(ApiError::BadRequest(format!("bootOrder names {device:?} twice")));
        }
    }
    if def.description.len() > MAX_VM_DESCRIPTION {
        return Err(ApiError::BadRequest(format!(
            "the description is {} bytes; at most {MAX_VM_DESCRIPTION}",
            def.description.len()
        )));
    }
    if def.tags.len() > MAX_VM_TAGS {
        return Err(ApiError::BadRequest(format!(
            "a VM has at most {MAX_VM_TAGS} tags, got {}",
            def.tags.len()
        )));
    }
    for tag in &def.tags {
        let ok = !tag.is_empty()
            && tag.len() <= MAX_VM_TAG_LEN
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '='));
        if !ok {
            return Err(ApiError::BadRequest(format!(
                "invalid tag {tag:?}: use 1 to {MAX_VM_TAG_LEN} letters, digits and - _ . : ="
            )));
        }
    }
    check_resources(def, host.max_vcpus)?;
    check_machine(def)?;
    super::vm_cloudinit::check_cloud_init(def)?;
    check_devices(def, vms, this_vm)
}

fn check_resources(def: &VmDefinition, host_cpus: u32) -> Result<(), ApiError> {
    let r = &def.resources;
    let mut pinned = HashSet::new();
    for &cpu in &r.cpu_pinning {
        if cpu >= host_cpus {
            return Err(ApiError::BadRequest(format!(
                "cpuPinning names host CPU {cpu}; this host has CPUs 0 to {}",
                host_cpus - 1
            )));
        }
        if !pinned.insert(cpu) {
            return Err(ApiError::BadRequest(format!("cpuPinning names host CPU {cpu} twice")));
        }
    }
    if let Some(weight) = r.cpu_weight {
        if !(1..=MAX_CPU_WEIGHT).contains(&weight) {
            return Err(ApiError::BadRequest(format!(
                "cpuWeight must be between 1 and {MAX_CPU_WEIGHT}, got {weight}"
            )));
        }
    }
    if let Some(quota) = r.cpu_quota_percent {
        let max = 100 * host_cpus;
        if !(1..=max).contains(&quota) {
            return Err(ApiError::BadRequest(format!(
                "cpuQuotaPercent must be between 1 and {max} (100 per host CPU), got {quota}"
            )));
        }
    }
    if let Some(nice) = r.nice {
        if !(-20..=19).contains(&nice) {
            return Err(ApiError::BadRequest(format!(
                "nice must be between -20 (most favoured) and 19, got {nice}"
            )));
        }
    }
    if r.disk_iops == Some(0) || r.disk_bytes_per_sec == Some(0) {
        return Err(ApiError::BadRequest(
            "disk limits must be above 0 (leave them out for none)".into(),
        ));
    }
    Ok(())
}

/// What the machine type allows.
fn check_machine(def: &VmDefinition) -> Result<(), ApiError> {
    if def.sandbox_kernel {
        if def.machine != MachineType::Microvm {
            return Err(ApiError::Conflict(
                "sandboxKernel needs machine microvm (the sandbox kernel has virtio-mmio drivers only)".into(),
            ));
        }
        if !def
            .disks
            .first()
            .is_some_and(|d| !d.read_only && d.bus == DiskBus::VirtioBlk)
        {
            return Err(ApiError::Conflict(
                "sandboxKernel boots the first disk as its root file system: it must be a writable virtio-blk disk"
                    .into(),
            ));
        }
    }
    if def.machine != MachineType::Microvm {
        return Ok(());
    }
    let conflict = |what: &str| {
        Err(ApiError::Conflict(format!(
            "machine microvm conflicts with {what}: microvm has virtio devices and SeaBIOS only; use machine q35"
        )))
    };
    if def.firmware == Firmware::Uefi {
        return conflict("firmware uefi");
    }
    if !def.cdroms.is_empty() {
        return conflict("CD-ROM drives");
    }
    if def.display == Display::Vnc {
        return conflict("a VNC display");
    }
    if def.nics.iter().any(|n| n.model == NicModel::E1000) {
        return conflict("an e1000 NIC");
    }
    if let Some(disk) = def.disks.iter().find(|d| !matches!(d.bus, DiskBus::VirtioBlk)) {
        return conflict(&format!("disk '{}' on bus {}", disk.disk, disk.bus.as_str()));
    }
    Ok(())
}

/// A disk or ISO name checked by the storage pool's own rule (the one that names its files), so
/// a definition never refers to a name the pool could not hold.
pub(super) fn check_pool_name(what: &str, name: &str) -> Result<(), ApiError> {
    viv_storage::name::check(name).map_err(|err| ApiError::BadRequest(format!("invalid {what} name: {err}")))
}

/// Names of disks and ISOs, and conflicts between devices: within the VM and with other VMs.
fn check_devices(def: &VmDefinition, vms: &[VmRow], this_vm: Option<&str>) -> Result<(), ApiError> {
    let mut disks = HashSet::new();
    for disk in &def.disks {
        check_pool_name("disk", &disk.disk)?;
        if !disks.insert(disk.disk.as_str()) {
            return Err(ApiError::Conflict(format!(
                "disk '{}' is attached twice to this VM",
                disk.disk
            )));
        }
    }
    for cdrom in &def.cdroms {
        if let Some(iso) = &cdrom.iso {
            check_pool_name("ISO", iso)?;
        }
    }
    let mut macs = HashSet::new();
    for nic in &def.nics {
        let mac = nic.mac.as_deref().unwrap_or_default().to_ascii_lowercase();
        if !valid_mac(&mac) {
            return Err(ApiError::BadRequest(format!(
                "invalid MAC address {mac:?}: six hex pairs separated by ':', unicast (even first byte)"
            )));
        }
        if !macs.insert(mac.clone()) {
            return Err(ApiError::Conflict(format!(
                "MAC address {mac} is used twice in this VM"
            )));
        }
    }
    for other in vms.iter().filter(|r| Some(r.id.as_str()) != this_vm) {
        let Ok(theirs) = definition_of(&other.definition) else {
            continue;
        };
        let theirs_pending = other.pending_definition.as_deref().and_then(|p| definition_of(p).ok());
        for their in std::iter::once(&theirs).chain(theirs_pending.as_ref()) {
            for disk in &def.disks {
                let clash = their.disks.iter().find(|d| d.disk == disk.disk);
                if let Some(d) = clash {
                    let writable = !disk.read_only || !d.read_only;
                    if writable && !(disk.shareable && d.shareable) {
                        return Err(ApiError::Conflict(format!(
                            "disk '{}' is attached to VM '{}'{}; attach it read-only on both, or shareable on both",
                            disk.disk,
                            other.name,
                            if d.read_only { " read-only" } else { " read-write" }
                        )));
                    }
                }
            }
            for nic in &their.nics {
                if let Some(mac) = nic.mac.as_deref().map(str::to_ascii_lowercase) {
                    if macs.contains(&mac) {
                        return Err(ApiError::Conflict(format!("MAC address {mac} is VM '{}'s", other.name)));
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_merge_patch_replaces_removes_and_merges() {
        let mut doc = serde_json::json!({"a": 1, "b": {"c": 2, "d": 3}, "e": [1]});
        merge_patch(&mut doc, &serde_json::json!({"a": null, "b": {"c": 5}, "e": [2, 3]}));
        assert_eq!(doc, serde_json::json!({"b": {"c": 5, "d": 3}, "e": [2, 3]}));
    }

    #[test]
    fn macs_are_checked() {
        assert!(valid_mac(&mac_with_prefix("52:54:00")));
        assert!(valid_mac_prefix("52:54:00") && !valid_mac_prefix("53:54:00") && !valid_mac_prefix("52:54"));
        assert!(valid_mac("52:54:00:ab:cd:ef"));
        assert!(!valid_mac("53:54:00:ab:cd:ef"), "multicast");
        assert!(!valid_mac("52:54:00:ab:cd"));
        assert!(!valid_mac("52:54:00:ab:cd:eg"));
    }

    #[test]
    fn changed_fields_name_the_api_fields() {
        let a = VmDefinition::default();
        let mut b = a.clone();
        b.memory_mib = 1024;
        b.description = "x".into();
        assert_eq!(changed_fields(&a, &b).unwrap(), vec!["description", "memoryMib"]);
    }
}
