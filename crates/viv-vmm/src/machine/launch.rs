//! Starting a machine's QEMU: its descriptors, its jail, its supervision.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use viv_jail::cgroup::Limits;
use viv_jail::{Bind, JailSpec};

use super::{
    fd_number, fdset_number, machine_arguments, DiskFormat, Firmware, Handed, LaunchMachineError, Machine, MachineSpec,
    NicBackend,
};
use crate::confine::{Confinement, JailResources};
use crate::process::VmProcess;
use crate::qemu::{Qemu, QemuVm};
use crate::Accel;

/// Opens what `handed` names, each descriptor moved to a number above every target so that the
/// child can `dup2` them into place in any order.
fn open_handed(spec: &MachineSpec, handed: &[Handed]) -> Result<Vec<OwnedFd>, LaunchMachineError> {
    let floor = fd_number(handed.len());
    handed
        .iter()
        .map(|item| {
            let fd: OwnedFd = match item {
                Handed::File { path, writable } => std::fs::OpenOptions::new()
                    .read(true)
                    .write(*writable)
                    .open(path)
                    .map_err(|source| LaunchMachineError::Open {
                        path: path.clone(),
                        source,
                    })?
                    .into(),
                Handed::Tap { nic } => {
                    let NicBackend::Tap(tap) = &spec.nics[*nic].backend else {
                        unreachable!("only tap NICs hand a descriptor over");
                    };
                    tap.try_clone().map_err(|source| LaunchMachineError::Io {
                        what: format!("duplicating the tap of NIC {}", spec.nics[*nic].id),
                        source,
                    })?
                }
            };
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor `fd` owns; it returns a new
            // descriptor or -1.
            let high = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, floor) };
            if high < 0 {
                return Err(LaunchMachineError::Io {
                    what: "moving a descriptor for QEMU".into(),
                    source: std::io::Error::last_os_error(),
                });
            }
            // SAFETY: the kernel just returned this descriptor; nothing else owns it.
            Ok(unsafe { OwnedFd::from_raw_fd(high) })
        })
        .collect()
}

/// The cgroup limits of a machine: its memory plus QEMU's overhead, the CPU quota and weight of
/// its [`super::MachineResources`] (by default its vCPUs' worth of CPU at weight 100).
pub fn machine_limits(spec: &MachineSpec) -> Limits {
    let resources = &spec.resources;
    Limits {
        memory_bytes: (u64::from(spec.memory_mib) + crate::confine::memory_overhead_mib(spec.accel)) << 20,
        cpu_percent: resources.cpu_percent.unwrap_or_else(|| spec.cpus.vcpus().max(1) * 100),
        cpu_weight: resources.cpu_weight.unwrap_or(100),
        pids: 256,
        io_weight: 100,
    }
}

/// The jail of a machine: its run directory and the backing files of its qcow2 disks; every
/// other file comes as a descriptor.
fn jail_spec(
    jail: &JailResources,
    spec: &MachineSpec,
    program: &Path,
    args: Vec<String>,
    keep_fds: Vec<i32>,
) -> Result<JailSpec, LaunchMachineError> {
    let mut binds = vec![Bind::writable(&spec.run_dir)];
    for disk in spec.disks.iter().filter(|d| d.format == DiskFormat::Qcow2) {
        let chain = crate::qcow2::backing_chain(&disk.path).map_err(|source| LaunchMachineError::Io {
            what: format!("reading the backing chain of {}", disk.path.display()),
            source,
        })?;
        binds.extend(chain.into_iter().map(Bind::read_only));
    }
    if let Some(boot) = &spec.kernel {
        binds.push(Bind::read_only(&boot.kernel));
        binds.push(Bind::read_only(&boot.initramfs));
    }
    let (devices, groups) = crate::confine::accel_access(spec.accel);
    Ok(JailSpec {
        uid: jail.uid,
        gid: jail.uid,
        groups,
        binds,
        devices,
        new_network: true,
        cgroup_procs: jail
            .cgroup
            .as_ref()
            .map(viv_jail::cgroup::Cgroup::procs_files)
            .unwrap_or_default(),
        keep_fds,
        program: program.to_path_buf(),
        args,
    })
}

impl Qemu {
    /// Launches a general-purpose machine; returns once QEMU answers on QMP (the guest's
    /// firmware is running, nothing more).
    pub async fn launch_machine(&self, spec: &MachineSpec) -> Result<Machine, LaunchMachineError> {
        spec.validate()?;
        if !self.binary.is_file() {
            return Err(crate::LaunchError::MissingBinary {
                binary: self.binary.display().to_string(),
                package: "qemu-system-x86".into(),
            }
            .into());
        }
        if spec.accel == Accel::Kvm
            && std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_err()
        {
            return Err(crate::LaunchError::AccelUnavailable(Accel::Kvm).into());
        }
        if let Firmware::Uefi(ovmf) = &spec.firmware {
            ovmf.check()?;
            ovmf.ensure_nvram()?;
        }
        for stale in [
            spec.qmp_socket(),
            spec.serial_socket(),
            spec.vnc_socket(),
            spec.agent_socket(),
        ] {
            let _ = std::fs::remove_file(stale);
        }
        let confined = !matches!(self.confinement, Confinement::None);
        let backings = super::read_backings(spec)?;
        let (args, handed) = machine_arguments(spec, confined, &backings);
        let fds = open_handed(spec, &handed)?;
        let qemu_log = spec.qemu_log();
        let log = std::fs::File::create(&qemu_log).map_err(|source| LaunchMachineError::Io {
            what: format!("creating {}", qemu_log.display()),
            source,
        })?;
        let targets: Vec<i32> = (0..fds.len()).map(fd_number).collect();
        let (mut command, jail) = match &self.confinement {
            Confinement::Jail(config) => {
                let jail = JailResources::allocate_for(config, &spec.vm_id, &machine_limits(spec))?;
                let built = give_run_dir(&jail, spec)
                    .and_then(|()| jail_spec(&jail, spec, &self.binary, args, targets.clone()));
                match built {
                    Ok(jail_spec) => (jail_spec.command(&config.jailer), Some(jail)),
                    Err(err) => {
                        jail.release();
                        return Err(err);
                    }
                }
            }
            Confinement::None | Confinement::Seccomp => {
                let mut command = std::process::Command::new(&self.binary);
                command.args(args).env_clear();
                (command, None)
            }
        };
        let io = |source| LaunchMachineError::Io {
            what: "opening the machine's log".into(),
            source,
        };
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io)?)
            .stderr(log.try_clone().map_err(io)?);
        let moves: Vec<(i32, i32)> = fds.iter().map(|fd| fd.as_raw_fd()).zip(targets).collect();
        let jailed = jail.is_some();
        let no_new_privs = matches!(self.confinement, Confinement::Seccomp);
        let affinity = spec.resources.host_cpus.as_ref().map(|cpus| {
            // SAFETY: an all-zero cpu_set_t is the empty set.
            let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
            for &cpu in cpus {
                // SAFETY: CPU_SET writes inside `set`; validate checked the numbers are below
                // CPU_SETSIZE.
                unsafe { libc::CPU_SET(cpu as usize, &mut set) };
            }
            set
        });
        let nice = spec.resources.nice;
        // Unjailed, a user-mode NIC gets a network namespace of its own all the same, where the
        // host allows it (root); the jail makes one anyway.
        let own_network = !jailed && spec.nics.iter().any(|n| matches!(n.backend, NicBackend::User));
        // SAFETY: runs in the child between fork and exec and calls only async-signal-safe
        // functions (setsid, dup2, prctl, sched_setaffinity, setpriority, unshare) on integers
        // and a cpu_set_t copied before the fork (`moves`, `affinity`, `nice`), which are not
        // modified; the source descriptors stay open in the parent until spawn returns (`fds`
        // lives until then), and each is above every target, so no dup2 overwrites a source
        // still to be moved.
        unsafe {
            command.pre_exec(move || {
                if !jailed && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Inherited through exec (and the jailer's) by every thread QEMU creates.
                if let Some(set) = &affinity {
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(nice) = nice {
                    if libc::setpriority(libc::PRIO_PROCESS, 0, nice) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if own_network {
                    // Best effort: without the privilege, QEMU shares the server's network.
                    let _ = libc::unshare(libc::CLONE_NEWNET);
                }
                for &(from, to) in &moves {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let spawned = VmProcess::spawn(&mut command);
        drop(fds);
        drop(command);
        let process = match spawned {
            Ok(process) => Arc::new(process),
            Err(source) => {
                if let Some(jail) = &jail {
                    jail.release();
                }
                return Err(crate::LaunchError::Spawn {
                    binary: self.binary.display().to_string(),
                    source,
                }
                .into());
            }
        };
        let qmp = match crate::qemu::connect_qmp(&spec.qmp_socket(), &process).await {
            Ok(qmp) => Arc::new(qmp),
            Err(reason) => {
                let _ = process.signal(libc::SIGKILL);
                process.exited().await;
                if let Some(jail) = &jail {
                    jail.release();
                }
                let said = std::fs::read_to_string(&qemu_log).unwrap_or_default();
                return Err(crate::LaunchError::Startup(format!("{reason}. QEMU said: {}", said.trim())).into());
            }
        };
        let events = qmp.events();
        let uid = jail.as_ref().map_or_else(crate::qemu::current_uid, |j| j.uid);
        let vm = QemuVm::supervised(
            process,
            qmp.clone(),
            events,
            jail,
            uid,
            0,
            false,
            spec.console_log(),
            qemu_log,
        );
        let first_runtime_fdset = fdset_number(handed.len());
        tracing::debug!(vm = %spec.vm_id, pid = ?crate::Vm::pid(&vm), "machine started");
        Ok(Machine::new(vm, qmp, spec, first_runtime_fdset))
    }
}

/// Gives the machine's uid its run directory (0700) and the files in it (0600).
fn give_run_dir(jail: &JailResources, spec: &MachineSpec) -> Result<(), LaunchMachineError> {
    jail.give_run_dir(&spec.run_dir)
        .map_err(|source| LaunchMachineError::Io {
            what: format!("giving machine {} its run directory", spec.vm_id),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::confine::JailConfig;
    use crate::machine::{Disk, DiskBus};
    use viv_jail::uids::UidPool;

    #[test]
    fn a_jailed_machine_sees_its_run_directory_and_backing_files_only() {
        let dir = tempfile::tempdir().unwrap();
        let run_dir = dir.path().join("m1");
        std::fs::create_dir_all(&run_dir).unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, b"").unwrap();
        let qemu_img = |args: &[&str]| {
            let ok = std::process::Command::new("qemu-img").args(args).status();
            ok.map(|s| s.success()).unwrap_or(false)
        };
        let top = dir.path().join("top.qcow2");
        let b = base.to_str().unwrap();
        if !qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            b,
            top.to_str().unwrap(),
            "1M",
        ]) {
            eprintln!("qemu-img is missing; skipping");
            return;
        }
        let config = Arc::new(JailConfig {
            jailer: "/proc/self/exe".into(),
            uids: UidPool::with_dir(dir.path().join("uids"), 3_100_000_000, 4).unwrap(),
            cgroups: None,
            key: "k".into(),
        });
        let mut spec = MachineSpec::new("m1", &run_dir, Accel::Tcg);
        spec.disks = vec![Disk {
            id: "vda".into(),
            path: top.clone(),
            format: DiskFormat::Qcow2,
            bus: DiskBus::VirtioBlk,
            read_only: false,
            boot_index: None,
        }];
        let jail = JailResources::allocate_for(&config, &spec.vm_id, &machine_limits(&spec)).unwrap();
        let (args, handed) = machine_arguments(&spec, true, &crate::machine::Backings::new());
        let jailed = jail_spec(&jail, &spec, Path::new("/usr/bin/qemu"), args, vec![3]).unwrap();
        assert_eq!(handed.len(), 1);
        assert_eq!(jailed.keep_fds, vec![3]);
        assert!(jailed.new_network, "taps come as descriptors");
        assert_eq!(jailed.binds, vec![Bind::writable(&run_dir), Bind::read_only(&base)]);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            std::fs::write(run_dir.join("console.log"), b"").unwrap();
            give_run_dir(&jail, &spec).unwrap();
            use std::os::unix::fs::MetadataExt as _;
            let meta = std::fs::metadata(run_dir.join("console.log")).unwrap();
            assert_eq!((meta.uid(), meta.mode() & 0o777), (jail.uid, 0o600));
        }
        jail.release();
    }

    /// The CPU quota and weight of a machine's resources are what its jail's cgroup enforces.
    #[test]
    fn a_jailed_machine_gets_its_cpu_quota_and_weight_in_its_cgroup() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let group = format!("vivarium-test/machine-{}", std::process::id());
        let Some(tree) = viv_jail::cgroup::CgroupTree::open(&group).unwrap() else {
            eprintln!("skipped: no memory controller on this host");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let config = Arc::new(JailConfig {
            jailer: "/proc/self/exe".into(),
            uids: UidPool::with_dir(dir.path().join("uids"), 3_100_000_100, 4).unwrap(),
            cgroups: Some(tree.clone()),
            key: "k".into(),
        });
        let mut spec = MachineSpec::new("quota", dir.path(), Accel::Tcg);
        spec.memory_mib = 128;
        spec.resources.cpu_percent = Some(150);
        spec.resources.cpu_weight = Some(300);
        let jail = JailResources::allocate_for(&config, &spec.vm_id, &machine_limits(&spec)).unwrap();
        let cgroup = jail.cgroup.clone().unwrap();
        let read = |name: &str| {
            cgroup
                .paths()
                .iter()
                .map(|d| d.join(name))
                .find(|f| f.exists())
                .map(|f| std::fs::read_to_string(f).unwrap().trim().to_owned())
        };
        let memory = (128 + crate::confine::memory_overhead_mib(Accel::Tcg)) << 20;
        match cgroup.version() {
            viv_jail::cgroup::Version::V2 => {
                assert_eq!(read("cpu.max").as_deref(), Some("150000 100000"));
                assert_eq!(read("cpu.weight").as_deref(), Some("300"));
                assert_eq!(read("memory.max"), Some(memory.to_string()));
            }
            viv_jail::cgroup::Version::V1 => {
                assert_eq!(read("cpu.cfs_quota_us").as_deref(), Some("150000"));
                assert_eq!(
                    read("cpu.shares").as_deref(),
                    Some("3072"),
                    "weight 300 is 3 × 1024 shares"
                );
                assert_eq!(read("memory.limit_in_bytes"), Some(memory.to_string()));
            }
        }
        jail.release();
        tree.remove_if_empty();
    }
}
