//! The jail a VMM process runs in, after Firecracker's jailer.
//!
//! A VMM parses device state and requests a guest controls, so one bug in it must not give a
//! guest the host. Each VMM process therefore runs:
//! - under a uid and gid of its own, allocated from a host-wide range ([`uids::UidPool`]) and
//!   recorded under `/run/vivarium/jail/uids`, with no supplementary groups but those asked for
//!   (the `kvm` group, for `/dev/kvm`);
//! - with no capabilities (the bounding set emptied before the uid changes, so nothing can
//!   come back) and `no_new_privs`;
//! - in its own session, mount namespace and IPC namespace, and, unless it needs the host's
//!   network (QEMU's user-mode stack), its own empty network namespace;
//! - with a root file system that is a small read-only tmpfs holding `/usr` (read-only), the
//!   few device nodes a VMM needs, and exactly the files of its VM at their host paths: its run
//!   directory (writable) and, read-only, the kernel, initramfs, disk layers and template memory
//!   it boots from ([`Bind`]); the host's other files, other VMs' files included, do not exist
//!   there;
//! - in a cgroup of its own ([`cgroup`]) with memory, CPU, pids and I/O limits, v2 or v1.
//!
//! [`JailSpec`] describes one jailed process. The server spawns `<jailer> __jail <spec as JSON>`
//! (the `viv` binary itself, through `/proc/self/exe`); [`run_jailer`] runs there, single
//! threaded, builds the jail step by step and executes the VMM, which thus keeps the pid the
//! server spawned. Every step that fails is reported on stderr (the VMM's log) with what was
//! being done, and the jailer exits with [`JAILER_FAILED`].
//!
//! Invariants: the spec is the whole description (the jailer reads nothing else from the
//! server); files are shown at the same paths as on the host, so paths inside QEMU's arguments,
//! in qcow2 backing chains and in QMP answers are host paths; the jail's root is read-only.

pub mod cgroup;
mod jailer;
pub mod uids;

use std::path::{Path, PathBuf};

pub use jailer::run_jailer;

/// The argument that makes the `viv` binary act as the jailer.
pub const JAILER_ARG: &str = "__jail";

/// Exit status of a jailer that could not build the jail (the VMM never ran).
pub const JAILER_FAILED: i32 = 125;

/// An empty directory the jailer mounts each jail's root on, in the jail's own mount namespace
/// (so one directory serves every jail, and the host never sees what is mounted there).
pub const JAIL_ROOT_MOUNT: &str = "/run/vivarium/jail/root";

/// A host path shown in the jail at the same path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Bind {
    /// The file or directory.
    pub path: PathBuf,
    /// Whether the VMM may write to it.
    pub writable: bool,
}

impl Bind {
    /// A read-only file or directory.
    pub fn read_only(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: false,
        }
    }

    /// A writable file or directory.
    pub fn writable(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: true,
        }
    }
}

/// One jailed process.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct JailSpec {
    /// The uid it runs as (not 0).
    pub uid: u32,
    /// Its gid (not 0).
    pub gid: u32,
    /// Supplementary groups (such as the owner group of `/dev/kvm`).
    pub groups: Vec<u32>,
    /// What it sees besides `/usr` and the basic device nodes.
    pub binds: Vec<Bind>,
    /// Device nodes it needs besides `/dev/null`, `/dev/zero`, `/dev/random` and
    /// `/dev/urandom` (such as `/dev/kvm`).
    pub devices: Vec<PathBuf>,
    /// Whether it gets an empty network namespace of its own (else it shares the host's).
    pub new_network: bool,
    /// The `cgroup.procs` files it joins before anything else (one per cgroup v1 hierarchy, or
    /// one for v2).
    pub cgroup_procs: Vec<PathBuf>,
    /// Descriptors it inherits besides 0, 1 and 2 (every other one is closed at exec).
    pub keep_fds: Vec<i32>,
    /// The program, by absolute path.
    pub program: PathBuf,
    /// Its arguments (without the program).
    pub args: Vec<String>,
}

impl JailSpec {
    /// The command that runs this spec through `jailer` (normally `/proc/self/exe`, the `viv`
    /// binary). The caller sets up stdio and the descriptors of [`JailSpec::keep_fds`].
    pub fn command(&self, jailer: &Path) -> std::process::Command {
        let mut command = std::process::Command::new(jailer);
        command
            .arg(JAILER_ARG)
            .arg(serde_json::to_string(self).expect("a jail spec serializes"))
            .env_clear();
        command
    }
}

/// Why a jail could not be set up or managed (host side).
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// A file or system call failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: std::io::Error,
    },
    /// Every uid of the range is taken.
    #[error("all {0} uids of the jail's range are in use; widen --jail-uids")]
    UidsExhausted(u32),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
}

/// An I/O error with what was being done.
pub(crate) fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> JailError {
    let context = context.into();
    move |source| JailError::Io { context, source }
}
