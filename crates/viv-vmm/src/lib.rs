//! Virtual machine monitors behind one trait.
//!
//! [`Vmm`] launches a VM from a [`VmSpec`] and returns a [`Vm`]: a supervised handle whose
//! [`Vm::exit`] watch reports when and why the VM stopped, and whose [`Vm::kill`] stops it and
//! waits until its process is gone. [`qemu::Qemu`] is the backend that runs everywhere (KVM
//! where `/dev/kvm` works, TCG otherwise); Firecracker and Cloud Hypervisor can be added as
//! further implementations. [`confine`] is how VMM processes are jailed. [`machine`] runs
//! general-purpose VMs (q35 or microvm, SeaBIOS or UEFI, disks, CD-ROMs, VNC) on the same
//! QEMU backend and supervision.
//!
//! Invariants:
//! - VMs outlive the server: a VMM process is started in a session of its own with no parent
//!   death signal, so a crashed, stopped or upgraded server leaves it running, and the next
//!   server takes it over with [`Vmm::adopt`] (pid, start time and command line checked);
//! - within a server, a VM never outlives its handle unless asked to: dropping a [`Vm`] kills
//!   its process; [`Vm::detach`] is the one way to let it go on without the handle;
//! - [`Vm::exit`] reports every stop with a reason, and a VM's jail (uid, cgroup) is released
//!   only once its process is gone.

pub mod backup;
pub mod confine;
mod exit;
pub mod host_memory;
pub mod huge_pages;
pub mod machine;
pub mod memdiff;
pub mod migstream;
pub mod process;
pub mod qcow2;
pub mod qemu;
pub mod qmp;

pub use process::ProcessIdentity;

use std::path::PathBuf;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;

/// Which accelerator to run guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when `/dev/kvm` is usable and the host is not itself a VM (nested KVM is often slower
    /// than TCG), TCG otherwise.
    Auto,
    /// Hardware virtualization; fails if `/dev/kvm` cannot be opened.
    Kvm,
    /// QEMU's software emulator.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(format!("unknown accelerator '{other}': use auto, kvm or tcg")),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

impl Accel {
    /// Resolves `Auto` to the accelerator this host should use.
    pub fn resolve(self) -> Accel {
        match self {
            Self::Auto => {
                let kvm_usable = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/kvm")
                    .is_ok();
                let nested = std::fs::read_to_string("/proc/cpuinfo")
                    .map(|c| {
                        c.lines()
                            .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "hypervisor"))
                    })
                    .unwrap_or(true);
                if kvm_usable && !nested {
                    Self::Kvm
                } else {
                    Self::Tcg
                }
            }
            other => other,
        }
    }

    /// QEMU's `-accel` and `-cpu` values for this accelerator (`Auto` counts as TCG: resolve it
    /// first).
    ///
    /// Under TCG the guest sees QEMU's `max` CPU without ERMS and FSRM ("fast string"
    /// `rep movsb`/`rep stosb`). With them, the guest kernel copies to and from user space and
    /// clears pages with `rep movsb`/`rep stosb`, and glibc's `memcpy`/`memset` use them for
    /// blocks from a few KiB up; TCG runs those one byte per iteration, about 10× slower than
    /// the vector loops chosen without them (a 256 KiB `memcpy` in the guest: 300 MiB/s with,
    /// 3.6 GiB/s without).
    ///
    /// The translation cache (`tb-size`) is half of an idle sandbox's private memory (~26 MiB
    /// touched), but that is the code the guest kernel and the agent keep running: capped at
    /// 16 MiB, the cache flushed on every command and `true` took ~250 ms instead of ~20
    /// (`bench/RESULTS.md`). 128 MiB leaves room for busy guests.
    pub fn qemu_accel_and_cpu(self) -> (&'static str, &'static str) {
        match self {
            Self::Kvm => ("kvm", "host"),
            Self::Auto | Self::Tcg => ("tcg,thread=multi,tb-size=128", "max,-erms,-fsrm"),
        }
    }
}

/// Everything needed to launch one VM.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The VM's id: unique on the host among this server's VMs (names its cgroup and its uid
    /// record; `[0-9a-zA-Z_-]`, at most 64 characters).
    pub vm_id: String,
    /// A short name used in logs and the guest host name.
    pub name: String,
    /// Directory for this VM's sockets, logs and disk overlay; created by the caller.
    pub run_dir: PathBuf,
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initramfs.
    pub initramfs: PathBuf,
    /// The writable root disk (a qcow2 overlay the caller created).
    pub root_disk: PathBuf,
    /// Where guest memory lives.
    pub memory: GuestMemory,
    /// Restore from this snapshot instead of booting.
    pub restore_from: Option<Restore>,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// The accelerator (already resolved, not `Auto`).
    pub accel: Accel,
    /// Extra kernel command line arguments.
    pub extra_cmdline: String,
    /// The network card, if any. Part of the device set: a snapshot restores only into a VM
    /// with the same (a card's backend may differ).
    pub network: Option<Network>,
}

/// A VM's network card and what it is connected to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// QEMU's user-mode network stack (no root needed): the guest is `10.0.2.15/24` behind NAT,
    /// with a gateway at `10.0.2.2` and a DNS forwarder at `10.0.2.3`. Without `internet` the
    /// stack is restricted: nothing leaves the VM.
    User {
        /// Whether the guest may reach the host's networks.
        internet: bool,
    },
    /// A tap device in a network namespace: QEMU runs in that namespace (the caller set it up,
    /// including the guest's gateway `10.0.2.2` on the tap and the redirect of `10.0.2.3`).
    Tap {
        /// The namespace file (`/run/netns/NAME`).
        netns: PathBuf,
        /// The tap device's name in the namespace.
        ifname: String,
    },
}

impl Network {
    /// The guest's address, gateway and DNS server, as the agent reads them from `viv.net=`.
    pub const GUEST_CONFIG: &'static str = "10.0.2.15/24,10.0.2.2,10.0.2.3";
}

/// Backing of a VM's guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestMemory {
    /// A file on a tmpfs such as /dev/shm, mapped shared (writes land in the file, so a snapshot
    /// with [`SnapshotMemory::External`] can leave memory there).
    SharedFile(PathBuf),
    /// A file mapped privately (copy-on-write: clones of one template share its unchanged pages).
    PrivateFile(PathBuf),
    /// Anonymous memory: never-touched pages cost nothing; right for restores whose state holds
    /// the memory.
    Anonymous,
}

/// A snapshot to restore.
#[derive(Debug, Clone)]
pub struct Restore {
    /// The saved state.
    pub state: PathBuf,
    /// `state` already opened by the caller, read instead of opening the path (a diff renamed
    /// over a node's full state later must not change what this restore reads).
    pub opened: Option<std::sync::Arc<std::fs::File>>,
    /// Where the guest memory of that state is.
    pub memory: SnapshotMemory,
    /// A stream composed for QEMU instead of `state` as it is, fed through a pipe onto the base
    /// file the VM maps privately ([`GuestMemory::PrivateFile`]).
    pub composed: Option<Composed>,
}

/// What a restore composes for QEMU from a node's files.
#[derive(Debug, Clone)]
pub enum Composed {
    /// A memory diff chain, loaded and checked.
    Chain(std::sync::Arc<memdiff::Chain>),
    /// A whole state without the pages its base already holds.
    OverBase(std::sync::Arc<memdiff::OverBase>),
}

/// Where a snapshot keeps guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotMemory {
    /// In the VM's shared memory file, which the snapshot leaves in place; the state file holds
    /// device state only (tens of KiB). Restores map that file.
    External,
    /// In the state file, after the device state; the snapshot stands alone.
    Included,
}

impl VmSpec {
    /// The Unix socket of the agent channel.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join("agent.sock")
    }
    /// The Unix socket of the monitor.
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
    /// The serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }
}

/// How a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    /// Whether we asked for it (kill), as opposed to a crash or a guest shutdown.
    pub requested: bool,
    /// A description for a person: exit status, guest panic, and the console's last lines.
    pub reason: String,
    /// What made it stop, for a program (a restart policy, a state machine).
    pub cause: ExitCause,
}

/// What made a VM's process stop, from the last QMP event and its exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCause {
    /// The host asked: a kill through the handle, or QEMU told to quit.
    Host,
    /// The guest powered itself off (QMP `SHUTDOWN` with `guest: true`, reason
    /// `guest-shutdown`), after an ACPI power button press or on its own.
    GuestShutdown,
    /// The guest reset itself and QEMU was told not to reboot (sandboxes run with `-no-reboot`;
    /// a general-purpose machine reboots without exiting, see `Machine::resets`).
    GuestReset,
    /// The guest kernel panicked and said so (pvpanic: QMP `GUEST_PANICKED`).
    GuestPanic,
    /// QEMU was killed by this signal, which the host did not send through the handle.
    Signal(i32),
    /// QEMU exited on its own for another reason (an error; its log says which), or its exit
    /// status is unknown (a process taken over is not this server's child).
    Other,
}

impl ExitCause {
    /// Whether the stop is a crash: not asked for by the host nor a guest powering off.
    pub fn is_crash(self) -> bool {
        !matches!(self, Self::Host | Self::GuestShutdown)
    }
}

/// Why a VM could not be launched.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// The VMM binary is missing.
    #[error("{binary} is not installed (install the Debian package {package})")]
    MissingBinary {
        /// The program.
        binary: String,
        /// Its package.
        package: String,
    },
    /// The requested accelerator is not available.
    #[error("accelerator {0} is not available on this host")]
    AccelUnavailable(Accel),
    /// Spawning the process failed.
    #[error("starting {binary}: {source}")]
    Spawn {
        /// The program.
        binary: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The VMM started but exited or never became controllable.
    #[error("the VM did not start: {0}")]
    Startup(String),
    /// A host resource VMs need (jail uids) is used up.
    #[error("{0}")]
    Exhausted(String),
}

/// A VM a previous server left running, to be taken over.
#[derive(Debug, Clone)]
pub struct Adoption {
    /// Its id (as in its [`VmSpec`]).
    pub vm_id: String,
    /// Its run directory (its control socket is there).
    pub run_dir: PathBuf,
    /// Its process as recorded when it started.
    pub identity: ProcessIdentity,
}

impl Adoption {
    /// The Unix socket of the monitor.
    pub fn control_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }
}

/// Why a VM could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// Its process is gone (or the pid now belongs to another process).
    #[error("its VM process is gone")]
    Gone,
    /// The process runs but cannot be controlled (it is killed).
    #[error("its VM does not answer on its control socket: {0}")]
    Unresponsive(String),
}

/// A VM taken over, and what it was doing.
pub type Adopted = (Box<dyn Vm>, AdoptedState);

/// What a taken-over VM was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdoptedState {
    /// Its vCPUs run.
    Running,
    /// Its vCPUs are stopped (a pause, fork or snapshot was under way, or a save finished).
    Stopped,
}

/// Why an operation on a running VM failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The control channel failed.
    #[error("VM control: {0}")]
    Control(#[from] qmp::QmpError),
    /// A snapshot could not be written or read.
    #[error("snapshot: {0}")]
    Snapshot(String),
    /// The VM is not running any more.
    #[error("the VM has stopped: {0}")]
    Stopped(String),
    /// Waiting for the process failed.
    #[error("waiting for the VM process: {0}")]
    Io(#[from] std::io::Error),
}

/// A hypervisor backend.
pub trait Vmm: Send + Sync + 'static {
    /// The backend's name, such as `qemu`.
    fn name(&self) -> &'static str;
    /// How its processes are confined, for a person.
    fn confinement(&self) -> String;
    /// Launches a VM; returns once the VMM is running and controllable (not once the guest booted).
    fn launch<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, LaunchError>>;
    /// Takes over a VM a previous server left running.
    fn adopt<'a>(&'a self, vm: &'a Adoption) -> BoxFuture<'a, Result<Adopted, AdoptError>>;
    /// Kills every VM of this server (found by its cgroup, or by a command line naming a path
    /// under `run_root`) whose id `keep` does not hold, and releases their jails. Returns the
    /// ids of those killed.
    fn remove_orphans(&self, run_root: &std::path::Path, keep: &dyn Fn(&str) -> bool) -> Vec<String>;
    /// Removes what this server holds host-wide for its VMs (its cgroup tree) once none of its
    /// VMs is left.
    fn release_host(&self);
}

/// A running VM.
pub trait Vm: Send + Sync {
    /// The VMM process id.
    fn pid(&self) -> Option<u32>;
    /// The VMM process (pid and start time), recorded so a later server can take it over.
    fn identity(&self) -> ProcessIdentity;
    /// The uid its VMM runs as.
    fn uid(&self) -> u32;
    /// Lets the VM run on without this handle (the server is stopping and leaves it running);
    /// dropping the handle afterwards does not kill it.
    fn detach(&self);
    /// The image the guest's disk writes to now (its top overlay).
    fn root_disk(&self) -> BoxFuture<'_, Result<PathBuf, VmError>>;
    /// Watches for the VM stopping; holds `None` while it runs.
    fn exit(&self) -> watch::Receiver<Option<VmExit>>;
    /// Whether the guest has opened the agent channel. QEMU only forwards bytes to a
    /// virtio-serial port the guest has opened, and bytes a host sends earlier can stay stuck in
    /// the socket, so the host connects only once this turns true.
    fn agent_port_open(&self) -> watch::Receiver<bool>;
    /// Pauses the VM and writes its state to `state_file`, guest memory included or not. The VM
    /// stays paused: kill it afterwards, or [`Vm::resume`] it. The file is written, not synced:
    /// the caller syncs it before anything relies on it, which lets it kill or resume the VM
    /// meanwhile (see [`sync_file`]).
    fn snapshot<'a>(
        &'a self,
        state_file: &'a std::path::Path,
        memory: SnapshotMemory,
    ) -> BoxFuture<'a, Result<(), VmError>>;
    /// Stops the guest's vCPUs (the VM keeps its state and can be resumed).
    fn pause(&self) -> BoxFuture<'_, Result<(), VmError>>;
    /// Lets a paused VM (see [`Vm::pause`] and [`Vm::snapshot`]) run again.
    fn resume(&self) -> BoxFuture<'_, Result<(), VmError>>;
    /// Makes `overlay` (a new qcow2 file whose backing file is the current root disk) the VM's
    /// root disk, so that the current one is written no more and can be kept as a frozen layer.
    fn replace_root_disk<'a>(&'a self, overlay: &'a std::path::Path) -> BoxFuture<'a, Result<(), VmError>>;
    /// Stops the VM at once and waits until its process is gone.
    fn kill(&self) -> BoxFuture<'_, Result<(), VmError>>;
}

/// Time a VMM gets to create its control socket.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes the data of the file at `path` to its disk (`fdatasync`), off the async threads: a
/// state [`Vm::snapshot`] wrote is durable once this returns.
pub async fn sync_file(path: &std::path::Path) -> std::io::Result<()> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.sync_data())
        .await
        .map_err(std::io::Error::other)?
}
