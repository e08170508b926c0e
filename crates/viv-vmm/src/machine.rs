//! General-purpose machines: long-lived VMs that boot any OS from disks or ISOs through firmware
//! (SeaBIOS or UEFI), as opposed to sandboxes, which boot our kernel and agent directly or are
//! restored from snapshots ([`crate::qemu`]).
//!
//! A [`MachineSpec`] describes one machine: machine type (`q35`, or `microvm` for virtio-only
//! guests), firmware, CPU topology, memory, disks, CD-ROM drives, NICs, an optional VNC display,
//! and its [`MachineResources`] (CPU pinning, CPU quota and weight, priority, disk I/O limits:
//! see that module for how each is enforced).
//! [`crate::qemu::Qemu::launch_machine`] starts it and returns a [`Machine`] handle with the QMP
//! operations an operator needs (ACPI power button, pause, resume, quit, status, CD medium
//! change and eject, online disk resize, PNG screenshot, I/O limits in force, QMP events and a
//! count of guest resets); [`crate::qemu::Qemu::adopt_machine`] takes over a machine a previous
//! server started, reading back from QEMU what changed at run time (CD media, fd sets in use).
//!
//! NICs are on a tap device the server opened ([`NicBackend::Tap`]) or on QEMU's user-mode
//! stack ([`NicBackend::User`]: DHCP for the guest, nothing beyond QEMU, since QEMU runs in a
//! network namespace of its own), as virtio-net or e1000.
//!
//! How a machine ends is told apart ([`crate::VmExit::cause`]): the guest powering off, a guest
//! kernel panic (q35 machines have a `pvpanic` device and QEMU exits on a reported panic,
//! `-action panic=exit-failure`, rather than letting the guest reboot), QEMU killed by a
//! signal, or the host's request. A guest reboot does not end a machine (QEMU resets it):
//! [`Machine::resets`] counts them.
//!
//! Every machine has, in its run directory: `qmp.sock` (QMP), `serial.sock` (the first serial
//! port, a telnet-mode socket server the host connects to, to read and write the console and
//! send a break; QEMU keeps no console log, which a guest could grow without bound: the host's
//! reader does), `vnc.sock` with a VNC display, and `qemu.log` (QEMU's stderr).
//!
//! Invariants:
//! - QEMU opens no file of the server's by name: every disk image, ISO and firmware file is
//!   opened by the server and handed over as an inherited descriptor in a QMP fd set
//!   (`-add-fd`, then `/dev/fdset/N`), and media inserted at run time are passed the same way
//!   over QMP (`add-fd`). Only what a jailed QEMU must open itself is shown in its jail: its run
//!   directory (writable) and, read-only, the backing files of qcow2 disks;
//! - a descriptor is opened with exactly the access the guest gets (read-only disks, ISOs and
//!   firmware code read-only), so a read-only disk cannot be written even by a subverted QEMU;
//! - a machine is supervised like a sandbox VM ([`crate::qemu`]'s supervisor): its QEMU runs in
//!   its own session, outlives the server, is killed when its handle is dropped without
//!   [`Machine::detach`], and its jail is released only once its process is gone;
//! - a disk's format node is always `disk-ID`; a disk with I/O limits has a `throttle` filter
//!   `io-ID` above it, which its device is attached to and which a resize addresses;
//! - the microvm sandbox path is untouched: machines build their own command line.

mod adopt;
mod backup;
mod command_line;
mod hotplug;
mod launch;
mod migrate;
mod ops;
mod resources;
mod snapshot;
mod state;
mod stats;

pub use launch::machine_limits;

#[cfg(test)]
pub(crate) use command_line::Backings;
pub(crate) use command_line::{fd_number, fdset_number, machine_arguments, read_backings, Handed};
pub use hotplug::{HotDisk, HotplugError};
pub use resources::{online_cpus, parse_cpu_list, IoLimits, MachineResources};

pub use migrate::{MigrationProgress, MigrationStats, MIGRATE_SOCKET, NBD_SOCKET};
pub use ops::{
    EjectError, IoLimitsError, Machine, MachineStatus, MediumError, PauseError, PowerOffError, QuitError, ResizeError,
    ResumeError, ScreenshotError, Shutdown, ShutdownError, StatusError,
};
pub use snapshot::SnapshotError;
pub use state::StateError;
pub use stats::{BlockStats, BlockStatsError};

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::qemu::SECCOMP;
use crate::Accel;

/// Where Debian's `ovmf` package puts the UEFI firmware code (4 MiB flash layout).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Where Debian's `ovmf` package puts the template of the UEFI variable store.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// The first descriptor number handed to QEMU; the files of a machine follow.
pub(crate) const FIRST_FD: i32 = 3;
/// Ports of q35's built-in AHCI controller (ICH9).
const SATA_PORTS: usize = 6;
/// Longest Unix socket path the kernel accepts.
const MAX_SOCKET_PATH: usize = 107;

/// The machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MachineType {
    /// A modern PC (PCIe, AHCI, ACPI): boots anything.
    #[default]
    Q35,
    /// QEMU's minimal virtio-mmio machine: virtio-blk disks and virtio-net only, SeaBIOS only,
    /// no CD-ROMs and no display.
    Microvm,
}

/// The firmware.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Firmware {
    /// SeaBIOS, QEMU's default BIOS.
    #[default]
    SeaBios,
    /// UEFI (OVMF).
    Uefi(Ovmf),
}

/// The files of a UEFI machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ovmf {
    /// The firmware code, mapped read-only.
    pub code: PathBuf,
    /// The template the variable store is copied from.
    pub vars_template: PathBuf,
    /// This machine's own variable store (NVRAM), writable; created from the template when
    /// missing.
    pub nvram: PathBuf,
}

impl Ovmf {
    /// Debian's OVMF with the machine's NVRAM at `nvram`.
    pub fn debian(nvram: impl Into<PathBuf>) -> Self {
        Self {
            code: OVMF_CODE.into(),
            vars_template: OVMF_VARS.into(),
            nvram: nvram.into(),
        }
    }

    /// Replaces the machine's NVRAM with a fresh copy of the template (boot entries and every
    /// other variable are forgotten). Only while the machine is not running.
    pub fn reset_nvram(&self) -> Result<(), LaunchMachineError> {
        self.check()?;
        copy_new(&self.vars_template, &self.nvram)
    }

    pub(crate) fn check(&self) -> Result<(), LaunchMachineError> {
        for file in [&self.code, &self.vars_template] {
            if !file.is_file() {
                return Err(LaunchMachineError::FirmwareMissing {
                    path: file.clone(),
                    package: "ovmf".into(),
                });
            }
        }
        Ok(())
    }

    /// Creates the NVRAM from the template if it does not exist yet.
    pub(crate) fn ensure_nvram(&self) -> Result<(), LaunchMachineError> {
        if self.nvram.exists() {
            return Ok(());
        }
        copy_new(&self.vars_template, &self.nvram)
    }
}

/// Copies `from` to `to` through a temporary file, so `to` is never seen half written.
fn copy_new(from: &Path, to: &Path) -> Result<(), LaunchMachineError> {
    let partial = to.with_extension("partial");
    let io = |source| LaunchMachineError::Io {
        what: format!("creating the NVRAM {} from {}", to.display(), from.display()),
        source,
    };
    std::fs::copy(from, &partial).map_err(io)?;
    std::fs::rename(&partial, to).map_err(io)
}

/// vCPUs as sockets × cores × threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    /// Sockets.
    pub sockets: u32,
    /// Cores per socket.
    pub cores: u32,
    /// Threads per core.
    pub threads: u32,
}

impl CpuTopology {
    /// `n` single-threaded cores in one socket.
    pub fn cores(n: u32) -> Self {
        Self {
            sockets: 1,
            cores: n,
            threads: 1,
        }
    }

    /// The number of vCPUs.
    pub fn vcpus(&self) -> u32 {
        self.sockets.saturating_mul(self.cores).saturating_mul(self.threads)
    }
}

/// A disk image's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskFormat {
    /// qcow2 (its backing files, if any, are opened by QEMU by path).
    Qcow2,
    /// Raw.
    Raw,
}

/// The bus a disk is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskBus {
    /// virtio-blk (PCI on q35, MMIO on microvm).
    VirtioBlk,
    /// A SCSI disk on a virtio-scsi controller.
    VirtioScsi,
    /// An NVMe controller with one namespace.
    Nvme,
    /// A SATA port of q35's AHCI controller.
    Sata,
}

/// A disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Its id, unique among the machine's devices (`[A-Za-z0-9_-]`, at most 32 characters):
    /// names its QEMU device and, as `disk-ID`, its block node.
    pub id: String,
    /// The image.
    pub path: PathBuf,
    /// The image's format.
    pub format: DiskFormat,
    /// The bus.
    pub bus: DiskBus,
    /// Whether the guest may only read it.
    pub read_only: bool,
    /// Its place in the boot order (lower first), if the firmware may boot from it.
    pub boot_index: Option<u32>,
}

/// The device id of a machine's cloud-init seed drive ([`MachineSpec::seed`]).
pub const SEED_DRIVE: &str = "cidata";

/// The bus of a CD-ROM drive.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum CdromBus {
    /// A SATA port of q35's AHCI controller (what installers of every OS expect).
    #[default]
    Sata,
    /// A SCSI CD-ROM on the virtio-scsi controller (guests whose kernel lacks AHCI, as many
    /// cloud kernels do).
    VirtioScsi,
}

/// A CD-ROM drive (q35), whose medium can be changed or ejected while running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cdrom {
    /// Its id, unique among the machine's devices (as for [`Disk::id`]).
    pub id: String,
    /// The ISO in it at start, if any.
    pub iso: Option<PathBuf>,
    /// Its place in the boot order (lower first).
    pub boot_index: Option<u32>,
    /// Its bus.
    pub bus: CdromBus,
}

/// Where a network card's frames go.
#[derive(Debug, Clone)]
pub enum NicBackend {
    /// A tap device the server opened (with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), handed over
    /// as a descriptor.
    Tap(Arc<OwnedFd>),
    /// QEMU's user-mode network stack (slirp): the guest gets an address by DHCP
    /// (10.0.2.15/24). QEMU runs in a network namespace of its own (the jail's), which holds
    /// nothing but a loopback device that is down, so the guest reaches nothing beyond QEMU.
    User,
}

/// The network card model the guest sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NicModel {
    /// virtio-net (PCI on q35, MMIO on microvm).
    #[default]
    VirtioNet,
    /// An Intel e1000 (q35 only), for guests without virtio drivers.
    E1000,
}

/// A network card.
#[derive(Debug, Clone)]
pub struct Nic {
    /// Its id, unique among the machine's devices (as for [`Disk::id`]).
    pub id: String,
    /// Where its frames go.
    pub backend: NicBackend,
    /// The card model.
    pub model: NicModel,
    /// Its MAC address (`52:54:00:xx:xx:xx`).
    pub mac: String,
    /// Its place in the boot order (network boot), if any.
    pub boot_index: Option<u32>,
}

impl Nic {
    /// A virtio-net card on the tap device `tap`.
    pub fn tap(id: impl Into<String>, tap: Arc<OwnedFd>, mac: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            backend: NicBackend::Tap(tap),
            model: NicModel::VirtioNet,
            mac: mac.into(),
            boot_index: None,
        }
    }

    /// A virtio-net card on QEMU's user-mode stack.
    pub fn user(id: impl Into<String>, mac: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            backend: NicBackend::User,
            model: NicModel::VirtioNet,
            mac: mac.into(),
            boot_index: None,
        }
    }
}

/// The graphical display.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Display {
    /// None (serial console only).
    #[default]
    None,
    /// A standard VGA card shown through VNC on the machine's `vnc.sock`.
    Vnc,
}

/// Everything needed to launch one general-purpose machine.
#[derive(Debug, Clone)]
pub struct MachineSpec {
    /// The machine's id: unique on the host among this server's VMs (names its cgroup and uid
    /// record; `[0-9a-zA-Z_-]`, at most 64 characters).
    pub vm_id: String,
    /// Its name, shown by QEMU.
    pub name: String,
    /// Directory for its sockets and logs; created by the caller.
    pub run_dir: PathBuf,
    /// The machine type.
    pub machine: MachineType,
    /// The firmware.
    pub firmware: Firmware,
    /// vCPUs.
    pub cpus: CpuTopology,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// The accelerator (already resolved, not `Auto`).
    pub accel: Accel,
    /// Disks.
    pub disks: Vec<Disk>,
    /// CD-ROM drives.
    pub cdroms: Vec<Cdrom>,
    /// A cloud-init seed image, attached read-only as a SCSI CD-ROM (id [`SEED_DRIVE`]) on a
    /// virtio-scsi controller of its own, after every other drive and never booted from:
    /// virtio-scsi, unlike SATA, is in every cloud kernel. q35 only.
    pub seed: Option<PathBuf>,
    /// Network cards.
    pub nics: Vec<Nic>,
    /// The graphical display.
    pub display: Display,
    /// The SMBIOS system UUID the guest reads (`/sys/class/dmi/id/product_uuid`); QEMU's
    /// all-zero one when absent.
    pub uuid: Option<String>,
    /// CPU pinning, CPU quota and weight, priority, disk I/O limits.
    pub resources: MachineResources,
    /// A kernel booted directly (`-kernel`, `-initrd`, `-append`) instead of firmware booting
    /// a disk: the sandbox kernel for VMs made from sandboxes. On microvm it is loaded by qboot.
    pub kernel: Option<KernelBoot>,
    /// A virtio-serial port `vivarium.agent` on [`MachineSpec::agent_socket`]: the sandbox
    /// agent's channel.
    pub agent_channel: bool,
    /// Start waiting for a saved state (`-incoming defer`), loaded by [`Machine::load_state`].
    pub incoming: bool,
    /// The most vCPUs the machine may have (`-smp maxcpus`), for vCPUs added while it runs
    /// ([`Machine::set_vcpus`]); only with one core of one thread per socket.
    pub max_vcpus: Option<u32>,
    /// A virtio-balloon device (`q35`), for [`Machine::set_balloon`].
    pub balloon: bool,
    /// PCIe root ports reserved for hotplug on a `q35` machine (`hp0`…): each takes one disk
    /// added while the machine runs ([`Machine::hot_add_disk`]). Part of the machine's device
    /// set, so a saved state restores only into a machine with as many.
    pub hotplug_ports: u8,
}

/// A kernel a machine boots directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    /// The kernel image (shown read-only in the jail: QEMU reads it by path).
    pub kernel: PathBuf,
    /// The initramfs (likewise).
    pub initramfs: PathBuf,
    /// The kernel command line.
    pub cmdline: String,
}

impl MachineSpec {
    /// A q35 machine with SeaBIOS, one vCPU, 256 MiB and no devices.
    pub fn new(vm_id: impl Into<String>, run_dir: impl Into<PathBuf>, accel: Accel) -> Self {
        let vm_id = vm_id.into();
        Self {
            name: vm_id.clone(),
            vm_id,
            run_dir: run_dir.into(),
            machine: MachineType::Q35,
            firmware: Firmware::SeaBios,
            cpus: CpuTopology::cores(1),
            memory_mib: 256,
            accel,
            disks: Vec::new(),
            cdroms: Vec::new(),
            seed: None,
            nics: Vec::new(),
            display: Display::None,
            uuid: None,
            resources: MachineResources::default(),
            kernel: None,
            agent_channel: false,
            incoming: false,
            hotplug_ports: 0,
            max_vcpus: None,
            balloon: false,
        }
    }

    /// The agent channel's socket (QEMU listens), with [`MachineSpec::agent_channel`].
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    /// The serial console's socket (QEMU listens; one client at a time).
    pub fn serial_socket(&self) -> PathBuf {
        self.run_dir.join("serial.sock")
    }
    /// The VNC display's socket.
    pub fn vnc_socket(&self) -> PathBuf {
        self.run_dir.join("vnc.sock")
    }
    /// Where a host-side reader of the serial socket may log the console (QEMU does not).
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
    /// QEMU's own messages.
    pub fn qemu_log(&self) -> PathBuf {
        self.run_dir.join("qemu.log")
    }

    /// Checks the spec on its own (ids, shapes, what the machine type supports).
    pub fn validate(&self) -> Result<(), LaunchMachineError> {
        let invalid = |m: String| Err(LaunchMachineError::Invalid(m));
        let id_ok = |id: &str, max: usize| {
            !id.is_empty() && id.len() <= max && id.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        };
        if !id_ok(&self.vm_id, 64) {
            return invalid(format!("machine id {:?} must be 1 to 64 of [A-Za-z0-9_-]", self.vm_id));
        }
        if self.name.is_empty() || self.name.contains([',', '\n', '\0']) {
            return invalid(format!("machine name {:?} must be non-empty without commas", self.name));
        }
        if let Some(uuid) = &self.uuid {
            let hex: String = uuid.chars().filter(|c| *c != '-').collect();
            if uuid.len() != 36 || hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                return invalid(format!("{uuid:?} is not a UUID"));
            }
        }
        let t = self.cpus;
        if t.sockets == 0 || t.cores == 0 || t.threads == 0 || t.vcpus() > 288 {
            return invalid(format!(
                "CPU topology {}x{}x{} must have at least one of each and at most 288 vCPUs",
                t.sockets, t.cores, t.threads
            ));
        }
        if self.memory_mib < 16 {
            return invalid(format!("{} MiB of memory is too little (16 at least)", self.memory_mib));
        }
        let mut ids = std::collections::BTreeSet::new();
        let devices = self
            .disks
            .iter()
            .map(|d| (&d.id, d.boot_index))
            .chain(self.cdroms.iter().map(|c| (&c.id, c.boot_index)))
            .chain(self.nics.iter().map(|n| (&n.id, n.boot_index)));
        let mut boot = std::collections::BTreeMap::new();
        for (id, index) in devices {
            if !id_ok(id, 32) {
                return invalid(format!("device id {id:?} must be 1 to 32 of [A-Za-z0-9_-]"));
            }
            if !ids.insert(id.as_str()) {
                return invalid(format!("two devices have the id {id:?}"));
            }
            if let Some(index) = index {
                if let Some(other) = boot.insert(index, id) {
                    return invalid(format!("{other:?} and {id:?} have the same boot index {index}"));
                }
            }
        }
        if self.seed.is_some() && ids.contains(SEED_DRIVE) {
            return invalid(format!("the device id {SEED_DRIVE:?} is the seed drive's"));
        }
        for nic in &self.nics {
            let octets: Vec<&str> = nic.mac.split(':').collect();
            let hex = octets.len() == 6 && octets.iter().all(|o| o.len() == 2 && u8::from_str_radix(o, 16).is_ok());
            let unicast = hex && u8::from_str_radix(octets[0], 16).is_ok_and(|b| b & 1 == 0);
            if !unicast {
                return invalid(format!("NIC {:?}: {:?} is not a unicast MAC address", nic.id, nic.mac));
            }
        }
        let disk_ids: Vec<&str> = self.disks.iter().map(|d| d.id.as_str()).collect();
        self.resources
            .validate(&disk_ids)
            .map_err(LaunchMachineError::Invalid)?;
        let sata = self.disks.iter().filter(|d| d.bus == DiskBus::Sata).count()
            + self.cdroms.iter().filter(|c| c.bus == CdromBus::Sata).count();
        if sata > SATA_PORTS {
            return invalid(format!(
                "{sata} SATA disks and CD-ROM drives, but q35 has {SATA_PORTS} SATA ports"
            ));
        }
        if self.machine == MachineType::Microvm {
            if matches!(self.firmware, Firmware::Uefi(_)) {
                return invalid("microvm machines boot with SeaBIOS only, not UEFI".into());
            }
            if let Some(disk) = self.disks.iter().find(|d| d.bus != DiskBus::VirtioBlk) {
                return invalid(format!(
                    "disk {:?}: microvm machines have virtio-blk disks only",
                    disk.id
                ));
            }
            if !self.cdroms.is_empty() || self.seed.is_some() {
                return invalid("microvm machines have no CD-ROM drives".into());
            }
            if self.display != Display::None {
                return invalid("microvm machines have no display".into());
            }
            if let Some(nic) = self.nics.iter().find(|n| n.model != NicModel::VirtioNet) {
                return invalid(format!("NIC {:?}: microvm machines have virtio-net cards only", nic.id));
            }
        }
        if let Some(boot) = &self.kernel {
            if boot.cmdline.contains(['\n', '\0']) {
                return invalid("the kernel command line must be one line".into());
            }
        }
        for socket in [
            self.qmp_socket(),
            self.serial_socket(),
            self.vnc_socket(),
            self.agent_socket(),
        ] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return invalid(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter run directory",
                    socket.display()
                ));
            }
        }
        Ok(())
    }
}

/// Why a machine could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchMachineError {
    /// The spec is inconsistent or asks for what the machine type lacks.
    #[error("invalid machine: {0}")]
    Invalid(String),
    /// A firmware file is missing.
    #[error("firmware file {path} is missing (install the Debian package {package})")]
    FirmwareMissing {
        /// The file.
        path: PathBuf,
        /// The Debian package that provides it.
        package: String,
    },
    /// A disk image or ISO could not be opened.
    #[error("opening {path}: {source}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A host operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started, or exited or never answered on QMP (QEMU's log says why).
    #[error(transparent)]
    Launch(#[from] crate::LaunchError),
}

/// The block node of medium number `generation` of CD-ROM drive `id`.
pub(crate) fn medium_node(id: &str, generation: u64) -> String {
    format!("cd-{id}-{generation}")
}

#[cfg(test)]
mod tests;
