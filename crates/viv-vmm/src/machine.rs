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
mod launch;
mod ops;
mod resources;
mod snapshot;
mod stats;

pub use launch::machine_limits;
pub use resources::{online_cpus, parse_cpu_list, IoLimits, MachineResources};

pub use ops::{
    EjectError, IoLimitsError, Machine, MachineStatus, MediumError, PauseError, PowerOffError, QuitError, ResizeError,
    ResumeError, ScreenshotError, Shutdown, ShutdownError, StatusError,
};
pub use snapshot::SnapshotError;
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
        }
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
        for socket in [self.qmp_socket(), self.serial_socket(), self.vnc_socket()] {
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

/// A file or tap handed to QEMU as an inherited descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Handed {
    /// A file opened read-only or read-write, in its own fd set.
    File {
        /// The file.
        path: PathBuf,
        /// Whether QEMU may write it.
        writable: bool,
    },
    /// The tap device of NIC number `nic`.
    Tap {
        /// Index into [`MachineSpec::nics`].
        nic: usize,
    },
}

/// The descriptor number of handed-over item `index`.
pub(crate) fn fd_number(index: usize) -> i32 {
    FIRST_FD + index as i32
}

/// The fd set of handed-over item `index` (fd sets of files passed at run time are numbered
/// after all of these).
pub(crate) fn fdset_number(index: usize) -> u64 {
    index as u64 + 1
}

/// Collects a machine's command line and the descriptors it refers to.
struct CommandLine {
    args: Vec<String>,
    handed: Vec<Handed>,
}

impl CommandLine {
    fn push(&mut self, flag: &str, value: String) {
        self.args.push(flag.to_owned());
        self.args.push(value);
    }

    /// Hands `path` over and returns the name QEMU opens it by.
    fn file(&mut self, path: &Path, writable: bool) -> String {
        let index = self.handed.len();
        self.handed.push(Handed::File {
            path: path.to_path_buf(),
            writable,
        });
        let opaque: String = path
            .file_name()
            .map(|n| {
                n.to_string_lossy()
                    .chars()
                    .filter(|c| c.is_ascii_alphanumeric() || "._-".contains(*c))
                    .collect()
            })
            .unwrap_or_default();
        self.push(
            "-add-fd",
            format!("fd={},set={},opaque={opaque}", fd_number(index), fdset_number(index)),
        );
        format!("/dev/fdset/{}", fdset_number(index))
    }
}

fn boot(index: Option<u32>) -> String {
    index.map(|i| format!(",bootindex={i}")).unwrap_or_default()
}

/// The backing chains of a machine's qcow2 disks: disk id → its backing files, nearest first,
/// each with its format as the image above it records it.
pub(crate) type Backings = std::collections::HashMap<String, Vec<(PathBuf, DiskFormat)>>;

/// Reads the backing chains of `spec`'s qcow2 disks. A backing file whose format its overlay
/// does not record is refused (never probed).
pub(crate) fn read_backings(spec: &MachineSpec) -> Result<Backings, LaunchMachineError> {
    let mut backings = Backings::new();
    for disk in spec.disks.iter().filter(|d| d.format == DiskFormat::Qcow2) {
        let io = |source| LaunchMachineError::Io {
            what: format!("reading the backing chain of {}", disk.path.display()),
            source,
        };
        let chain = crate::qcow2::backing_chain(&disk.path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound && !disk.path.exists() {
                LaunchMachineError::Open {
                    path: disk.path.clone(),
                    source,
                }
            } else {
                io(source)
            }
        })?;
        let mut above = disk.path.clone();
        let mut levels = Vec::new();
        for path in chain {
            let format = match crate::qcow2::backing_format(&above).map_err(io)?.as_deref() {
                Some("qcow2") => DiskFormat::Qcow2,
                Some("raw") => DiskFormat::Raw,
                other => {
                    return Err(LaunchMachineError::Invalid(format!(
                        "{} names backing file {} with format {other:?}; only qcow2 and raw, recorded with the image, are opened",
                        above.display(),
                        path.display()
                    )))
                }
            };
            levels.push((path.clone(), format));
            above = path;
        }
        if !levels.is_empty() {
            backings.insert(disk.id.clone(), levels);
        }
    }
    Ok(backings)
}

/// The QEMU arguments for `spec` and the files and taps they expect as descriptors
/// ([`FIRST_FD`] onwards, in order). The backing files of qcow2 disks (`backings`) are handed
/// over read-only like every other file, named explicitly rather than found by QEMU.
pub(crate) fn machine_arguments(spec: &MachineSpec, seccomp: bool, backings: &Backings) -> (Vec<String>, Vec<Handed>) {
    let path = |p: &Path| p.display().to_string();
    let mut cl = CommandLine {
        args: Vec::new(),
        handed: Vec::new(),
    };
    let q35 = spec.machine == MachineType::Q35;
    cl.push("-name", spec.name.clone());
    if let Some(uuid) = &spec.uuid {
        cl.push("-uuid", uuid.clone());
    }
    let mut machine = match spec.machine {
        MachineType::Q35 => "q35".to_owned(),
        MachineType::Microvm => "microvm,rtc=on".to_owned(),
    };
    if let Firmware::Uefi(ovmf) = &spec.firmware {
        let code = cl.file(&ovmf.code, false);
        let vars = cl.file(&ovmf.nvram, true);
        cl.push(
            "-blockdev",
            format!("driver=raw,node-name=fw-code,read-only=on,file.driver=file,file.filename={code}"),
        );
        cl.push(
            "-blockdev",
            format!("driver=raw,node-name=fw-vars,read-only=off,file.driver=file,file.filename={vars}"),
        );
        machine.push_str(",pflash0=fw-code,pflash1=fw-vars");
    }
    cl.push("-machine", machine);
    let (accel, cpu) = match spec.accel {
        Accel::Kvm => ("kvm", "host"),
        _ => ("tcg,thread=multi,tb-size=128", "max"),
    };
    cl.push("-accel", accel.into());
    cl.push("-cpu", cpu.into());
    let t = spec.cpus;
    cl.push(
        "-smp",
        format!(
            "{},sockets={},cores={},threads={}",
            t.vcpus(),
            t.sockets,
            t.cores,
            t.threads
        ),
    );
    cl.push("-m", format!("{}M", spec.memory_mib));
    cl.args
        .extend(["-nodefaults", "-no-user-config", "-display", "none"].map(String::from));
    cl.push(
        "-chardev",
        format!(
            "socket,id=serial0,path={},server=on,wait=off,telnet=on",
            path(&spec.serial_socket())
        ),
    );
    cl.push("-serial", "chardev:serial0".into());
    cl.push("-qmp", format!("unix:{},server=on,wait=off", path(&spec.qmp_socket())));
    if spec.display == Display::Vnc {
        cl.push("-vnc", format!("unix:{}", path(&spec.vnc_socket())));
        cl.push("-device", "VGA,id=video0".into());
    }
    if seccomp {
        cl.push("-sandbox", SECCOMP.into());
    }
    if q35 {
        // A guest kernel's panic is reported (pvpanic) and ends QEMU: a crash, not a reboot.
        cl.push("-device", "pvpanic".into());
        cl.push("-action", "panic=exit-failure".into());
    }
    let mut sata_port = 0;
    if spec.disks.iter().any(|d| d.bus == DiskBus::VirtioScsi)
        || spec.cdroms.iter().any(|c| c.bus == CdromBus::VirtioScsi)
    {
        cl.push("-device", "virtio-scsi-pci,id=scsi0".into());
    }
    for disk in &spec.disks {
        let file = cl.file(&disk.path, !disk.read_only);
        let driver = match disk.format {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        };
        let format_node = format!("disk-{}", disk.id);
        let read_only = if disk.read_only { "on" } else { "off" };
        let mut options = format!(
            "driver={driver},node-name={format_node},read-only={read_only},discard=unmap,file.driver=file,file.filename={file}"
        );
        let mut level = String::from("backing");
        for (path, format) in backings.get(&disk.id).map(Vec::as_slice).unwrap_or_default() {
            let file = cl.file(path, false);
            let driver = match format {
                DiskFormat::Qcow2 => "qcow2",
                DiskFormat::Raw => "raw",
            };
            options.push_str(&format!(
                ",{level}.driver={driver},{level}.read-only=on,{level}.file.driver=file,{level}.file.filename={file}"
            ));
            level.push_str(".backing");
        }
        cl.push("-blockdev", options);
        // The device is attached to the throttle filter when the disk has I/O limits.
        let node = match spec.resources.disk_io.get(&disk.id).filter(|l| l.is_limited()) {
            Some(limits) => {
                let filter = resources::throttle_node(&disk.id);
                cl.push("-object", MachineResources::throttle_group(&disk.id, limits));
                cl.push(
                    "-blockdev",
                    format!("driver=throttle,node-name={filter},throttle-group={filter},file={format_node}"),
                );
                filter
            }
            None => format_node,
        };
        let id = &disk.id;
        let device = match (disk.bus, q35) {
            (DiskBus::VirtioBlk, true) => format!("virtio-blk-pci,drive={node},id={id}"),
            (DiskBus::VirtioBlk, false) => format!("virtio-blk-device,drive={node},id={id}"),
            (DiskBus::VirtioScsi, _) => format!("scsi-hd,bus=scsi0.0,drive={node},id={id}"),
            (DiskBus::Nvme, _) => format!("nvme,drive={node},id={id},serial={}", &id[..id.len().min(20)]),
            (DiskBus::Sata, _) => {
                sata_port += 1;
                format!("ide-hd,bus=ide.{},drive={node},id={id}", sata_port - 1)
            }
        };
        cl.push("-device", format!("{device}{}", boot(disk.boot_index)));
    }
    for cdrom in &spec.cdroms {
        let mut device = match cdrom.bus {
            CdromBus::Sata => {
                sata_port += 1;
                format!("ide-cd,bus=ide.{},id={}", sata_port - 1, cdrom.id)
            }
            CdromBus::VirtioScsi => format!("scsi-cd,bus=scsi0.0,id={}", cdrom.id),
        };
        if let Some(iso) = &cdrom.iso {
            let file = cl.file(iso, false);
            let node = medium_node(&cdrom.id, 0);
            cl.push(
                "-blockdev",
                format!("driver=raw,node-name={node},read-only=on,file.driver=file,file.filename={file}"),
            );
            device.push_str(&format!(",drive={node}"));
        }
        cl.push("-device", format!("{device}{}", boot(cdrom.boot_index)));
    }
    if let Some(seed) = &spec.seed {
        let file = cl.file(seed, false);
        cl.push("-device", "virtio-scsi-pci,id=seedscsi".into());
        cl.push(
            "-blockdev",
            format!("driver=raw,node-name=seed-{SEED_DRIVE},read-only=on,file.driver=file,file.filename={file}"),
        );
        cl.push(
            "-device",
            format!("scsi-cd,bus=seedscsi.0,drive=seed-{SEED_DRIVE},id={SEED_DRIVE}"),
        );
    }
    for (n, nic) in spec.nics.iter().enumerate() {
        match nic.backend {
            NicBackend::Tap(_) => {
                let fd = fd_number(cl.handed.len());
                cl.handed.push(Handed::Tap { nic: n });
                cl.push("-netdev", format!("tap,id=net-{},fd={fd}", nic.id));
            }
            NicBackend::User => cl.push("-netdev", format!("user,id=net-{}", nic.id)),
        }
        let model = match (nic.model, q35) {
            (NicModel::E1000, _) => "e1000",
            (NicModel::VirtioNet, true) => "virtio-net-pci",
            (NicModel::VirtioNet, false) => "virtio-net-device",
        };
        cl.push(
            "-device",
            format!(
                "{model},netdev=net-{},id={},mac={}{}",
                nic.id,
                nic.id,
                nic.mac,
                boot(nic.boot_index)
            ),
        );
    }
    (cl.args, cl.handed)
}

/// The block node of medium number `generation` of CD-ROM drive `id`.
pub(crate) fn medium_node(id: &str, generation: u64) -> String {
    format!("cd-{id}-{generation}")
}

#[cfg(test)]
mod tests;
