//! From a stored VM definition to the machine QEMU runs: disks and ISOs looked up in the storage
//! pool, boot indexes from the boot order, firmware with the VM's own NVRAM, and the errors a
//! person can act on when something a definition names is missing.
//!
//! Invariants:
//! - device ids are positional (`disk0`, `cd0`, `nic0`), so a VM's devices keep their ids across
//!   starts and a restarted server knows them again from the definition alone;
//! - a VM's files live in `DATA_DIR/vms/ID`: `nvram.fd` (UEFI variables, kept across starts)
//!   and `run/` (QEMU's sockets and log, given to the jailed QEMU's uid); its serial console's
//!   capped log is `DATA_DIR/consoles/ID/` ([`super::vm_console`]); nothing a user names becomes a path: disks and ISOs are looked up by
//!   name in the pool.

use std::path::PathBuf;

use sha2::Digest as _;

use viv_api::vms::{BootDevice, CdromBus, DiskBus, Display, Firmware, MachineType, NicModel, VmDefinition};
use viv_vmm::machine::{self, LaunchMachineError, MachineSpec};

use super::Manager;
use crate::error::ApiError;

impl Manager {
    /// The directory of VM `id`'s files.
    pub(super) fn vm_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("vms").join(id)
    }

    /// The run directory of VM `id` (sockets, QEMU's log).
    pub(super) fn vm_run_dir(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join("run")
    }

    /// The UEFI firmware files of VM `id`.
    pub(super) fn vm_ovmf(&self, id: &str) -> machine::Ovmf {
        machine::Ovmf::debian(self.vm_dir(id).join("nvram.fd"))
    }

    /// The machine VM `id` named `name` runs as with `def`.
    pub(super) async fn machine_spec(&self, id: &str, name: &str, def: &VmDefinition) -> Result<MachineSpec, ApiError> {
        let mut spec = MachineSpec::new(id, self.vm_run_dir(id), self.accel);
        spec.name = name.to_owned();
        spec.uuid = Some(vm_uuid(id));
        spec.machine = match def.machine {
            MachineType::Q35 => machine::MachineType::Q35,
            MachineType::Microvm => machine::MachineType::Microvm,
        };
        spec.firmware = match def.firmware {
            Firmware::Bios => machine::Firmware::SeaBios,
            Firmware::Uefi => machine::Firmware::Uefi(self.vm_ovmf(id)),
        };
        spec.cpus = machine::CpuTopology {
            sockets: def.cpu.sockets,
            cores: def.cpu.cores,
            threads: def.cpu.threads,
        };
        spec.memory_mib = def.memory_mib;
        spec.hotplug_ports = def.hotplug_ports.unwrap_or(0);
        spec.max_vcpus = def.max_vcpus;
        spec.balloon = def.balloon.unwrap_or(false) && def.machine == MachineType::Q35;
        spec.display = match def.display {
            Display::None => machine::Display::None,
            Display::Vnc => machine::Display::Vnc,
        };
        let boot = BootIndexes::new(def);
        for (i, disk) in def.disks.iter().enumerate() {
            let info = self.storage.disk_info(&disk.disk).await.map_err(|e| {
                let missing = e.kind() == viv_storage::ErrorKind::NotFound;
                super::storage::api(
                    e.kind(),
                    if missing {
                        format!("disk '{}' of VM '{name}' does not exist: create or upload it (viv disk create), or edit the VM", disk.disk)
                    } else {
                        format!("disk '{}' of VM '{name}': {e}", disk.disk)
                    },
                )
            })?;
            spec.disks.push(machine::Disk {
                id: format!("disk{i}"),
                path: info.path,
                format: match info.format {
                    viv_storage::DiskFormat::Qcow2 => machine::DiskFormat::Qcow2,
                    viv_storage::DiskFormat::Raw => machine::DiskFormat::Raw,
                },
                bus: match disk.bus {
                    DiskBus::VirtioBlk => machine::DiskBus::VirtioBlk,
                    DiskBus::VirtioScsi => machine::DiskBus::VirtioScsi,
                    DiskBus::Nvme => machine::DiskBus::Nvme,
                    DiskBus::Sata => machine::DiskBus::Sata,
                },
                read_only: disk.read_only,
                boot_index: boot.of(BootDevice::Disk, i),
            });
        }
        for (i, nic) in def.nics.iter().enumerate() {
            let mac = nic.mac.clone().unwrap_or_default();
            let mut card = match &nic.switch {
                None => machine::Nic::user(format!("nic{i}"), mac),
                // The tap lives while a descriptor of it is open: the spec's until QEMU has its
                // own copy, then QEMU's alone.
                Some(switch) => {
                    let (tap, ifname) = self
                        .switch_tap((id, name), &format!("nic{i}"), switch, tap_rules(nic)?)
                        .await?;
                    tracing::debug!(vm = %name, nic = i, tap = %ifname, switch = %switch, "NIC on a switch");
                    machine::Nic::tap(format!("nic{i}"), std::sync::Arc::new(tap), mac)
                }
            };
            card.model = match nic.model {
                NicModel::VirtioNet => machine::NicModel::VirtioNet,
                NicModel::E1000 => machine::NicModel::E1000,
            };
            card.boot_index = boot.of(BootDevice::Network, i);
            spec.nics.push(card);
        }
        let r = &def.resources;
        spec.resources = machine::MachineResources {
            host_cpus: (!r.cpu_pinning.is_empty()).then(|| r.cpu_pinning.clone()),
            cpu_percent: r.cpu_quota_percent,
            cpu_weight: r.cpu_weight,
            nice: r.nice,
            disk_io: Default::default(),
        };
        let limits = machine::IoLimits {
            iops: r.disk_iops,
            bps: r.disk_bytes_per_sec,
        };
        if limits.is_limited() {
            for disk in &spec.disks {
                spec.resources.disk_io.insert(disk.id.clone(), limits);
            }
        }
        for (i, cdrom) in def.cdroms.iter().enumerate() {
            let iso = match &cdrom.iso {
                Some(iso) => Some(self.iso_path(name, iso).await?),
                None => None,
            };
            spec.cdroms.push(machine::Cdrom {
                id: format!("cd{i}"),
                iso,
                boot_index: boot.of(BootDevice::Cdrom, i),
                bus: match cdrom.bus {
                    CdromBus::Sata => machine::CdromBus::Sata,
                    CdromBus::VirtioScsi => machine::CdromBus::VirtioScsi,
                },
            });
        }
        spec.seed = self.cloud_init_seed(id, name, def).await?;
        if def.sandbox_kernel {
            spec.kernel = Some(machine::KernelBoot {
                kernel: self.boot.kernel.clone(),
                initramfs: self.boot.initramfs.clone(),
                cmdline: self.qemu.guest_cmdline(self.accel, name, !def.nics.is_empty(), ""),
            });
            spec.agent_channel = true;
        }
        spec.validate().map_err(|e| launch_error(name, e))?;
        Ok(spec)
    }

    /// The file of ISO `iso` that VM `vm` names.
    pub(super) async fn iso_path(&self, vm: &str, iso: &str) -> Result<PathBuf, ApiError> {
        match self.storage.iso(iso).await {
            Ok(info) => Ok(info.path),
            Err(e) if e.kind() == viv_storage::ErrorKind::NotFound => Err(ApiError::NotFound(format!(
                "ISO '{iso}' of VM '{vm}' is not in the ISO library: upload it (viv iso add), or edit the VM"
            ))),
            Err(e) => Err(super::storage::api(e.kind(), format!("ISO '{iso}' of VM '{vm}': {e}"))),
        }
    }
}

/// The SMBIOS system UUID of VM `id`: stable for the VM, different for every VM (so a clone is
/// told apart from its source).
pub(super) fn vm_uuid(id: &str) -> String {
    let digest: [u8; 32] = sha2::Sha256::digest(format!("vivarium-vm-uuid:{id}").as_bytes()).into();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50; // name-based (version 5 layout)
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    super::uuid_shaped(bytes)
}

/// Boot indexes: the kinds in the boot order, first first; within a kind, devices in their
/// order. Kinds left out of the boot order are not booted from.
struct BootIndexes {
    order: Vec<(BootDevice, usize)>,
}

impl BootIndexes {
    fn new(def: &VmDefinition) -> Self {
        let count = |kind| match kind {
            BootDevice::Disk => def.disks.len(),
            BootDevice::Cdrom => def.cdroms.len(),
            BootDevice::Network => def.nics.len(),
        };
        let order = def
            .boot_order
            .iter()
            .flat_map(|&kind| (0..count(kind)).map(move |i| (kind, i)))
            .collect();
        Self { order }
    }

    fn of(&self, kind: BootDevice, index: usize) -> Option<u32> {
        self.order
            .iter()
            .position(|&(k, i)| k == kind && i == index)
            .map(|p| p as u32 + 1)
    }
}

/// A machine that could not be launched, as the API reports it.
pub(super) fn launch_error(vm: &str, e: LaunchMachineError) -> ApiError {
    use viv_vmm::LaunchError;
    match e {
        // Definitions are checked when stored; what only the machine layer knows (SATA ports)
        // is a conflict between devices.
        LaunchMachineError::Invalid(why) => ApiError::Conflict(format!("VM '{vm}' cannot start: {why}")),
        LaunchMachineError::FirmwareMissing { .. } => ApiError::Unavailable(format!("VM '{vm}' cannot start: {e}")),
        LaunchMachineError::Launch(LaunchError::MissingBinary { .. } | LaunchError::AccelUnavailable(_)) => {
            ApiError::Unavailable(format!("VM '{vm}' cannot start: {e}"))
        }
        LaunchMachineError::Launch(LaunchError::Exhausted(_)) => {
            ApiError::NoRoom(format!("VM '{vm}' cannot start now: {e}"))
        }
        other => ApiError::Internal(format!("VM '{vm}' did not start: {other}")),
    }
}

/// The rules of `nic`'s tap: its rate limits and its firewall, parsed as when it was stored.
pub(super) fn tap_rules(nic: &viv_api::vms::VmNic) -> Result<viv_net::switches::TapRules, ApiError> {
    let (allow_out, deny_out) = match nic_firewall(nic)? {
        Some(policy) => (policy.allow_cidrs, policy.deny_cidrs),
        None => (Vec::new(), Vec::new()),
    };
    Ok(viv_net::switches::TapRules {
        into_guest: nic.rate_in_kbps,
        from_guest: nic.rate_out_kbps,
        allow_out,
        deny_out,
    })
}

/// `nic`'s firewall as the sandbox policy engine reads its lists (400 for a bad entry or a host
/// name: a switch has no proxy to read names).
pub(super) fn nic_firewall(nic: &viv_api::vms::VmNic) -> Result<Option<viv_net::Policy>, ApiError> {
    let Some(firewall) = &nic.firewall else { return Ok(None) };
    let spec = viv_net::PolicySpec {
        allow_out: firewall.allow_out.clone(),
        deny_out: firewall.deny_out.clone(),
        ..viv_net::PolicySpec::open()
    };
    let policy = viv_net::Policy::from_spec(&spec).map_err(|e| ApiError::BadRequest(format!("firewall: {e}")))?;
    if policy.has_domains() {
        return Err(ApiError::BadRequest(
            "firewall: a NIC's lists take IPv4 addresses and CIDR blocks only (a switch has no proxy to read host names)".into(),
        ));
    }
    Ok(Some(policy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use viv_api::vms::{VmCdrom, VmDisk};

    #[test]
    fn boot_indexes_follow_the_boot_order() {
        let mut def = VmDefinition {
            disks: vec![
                VmDisk {
                    disk: "a".into(),
                    bus: DiskBus::VirtioBlk,
                    read_only: false,
                    shareable: false,
                };
                2
            ],
            cdroms: vec![VmCdrom::default()],
            boot_order: vec![BootDevice::Cdrom, BootDevice::Disk],
            ..VmDefinition::default()
        };
        let boot = BootIndexes::new(&def);
        assert_eq!(boot.of(BootDevice::Cdrom, 0), Some(1));
        assert_eq!(boot.of(BootDevice::Disk, 0), Some(2));
        assert_eq!(boot.of(BootDevice::Disk, 1), Some(3));
        def.boot_order = vec![BootDevice::Disk];
        assert_eq!(BootIndexes::new(&def).of(BootDevice::Cdrom, 0), None);
    }
}
