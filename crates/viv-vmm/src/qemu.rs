//! The QEMU backend: a `microvm` machine with virtio-mmio devices, controlled over QMP.
//!
//! Devices: the root disk as a `-blockdev` qcow2 overlay on `virtio-blk-device` (`-blockdev`
//! rather than `-drive`, because only that form survives migration, which snapshots use), the
//! agent channel as a virtio-serial port backed by a Unix socket, the serial console written to
//! `console.log`, guest memory as a `memory-backend-file` so it can be shared with snapshots, and
//! a network card whose tap device the server opens and hands over as a descriptor.
//!
//! QEMU runs confined ([`Confinement`]): jailed, it can open no file of the server's, so saved
//! states go both ways through descriptors the server opens and passes over QMP (`add-fd`, then
//! a `file:/dev/fdset/N` migration), and the template memory a clone maps privately is opened
//! read-only (`readonly=on,rom=off`). Its seccomp filter forbids spawning helpers anyway.
//!
//! Invariants: a QEMU process is started in its own session without a parent death signal (it
//! outlives the server); a handle that is dropped without [`Vm::detach`] kills it; its jail is
//! released by its supervisor once the process is gone, never before.

use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt as _;
use tokio::sync::{oneshot, watch};

use crate::confine::{Confinement, JailResources};
use crate::exit::{exit_cause, LastEvent};
use crate::process::{ProcessIdentity, VmProcess};
use crate::qmp::Qmp;
use crate::{
    Accel, AdoptError, Adopted, AdoptedState, Adoption, ExitCause, GuestMemory, LaunchError, Restore, SnapshotMemory,
    Vm, VmError, VmExit, VmSpec, Vmm, STARTUP_TIMEOUT,
};

mod running;

use running::{restore, top_block_node};
pub(crate) use running::{wait_migration, QemuVm};

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// The QEMU binary (resolved on PATH when a bare name is given).
    pub(crate) binary: PathBuf,
    /// The host's TSC frequency, which a TCG guest's TSC runs at.
    host_tsc_khz: Option<u64>,
    pub(crate) confinement: Confinement,
}

impl Default for Qemu {
    fn default() -> Self {
        Self::with_binary("qemu-system-x86_64")
    }
}

/// The host CPU's TSC frequency in kHz, from `/proc/cpuinfo`, when the TSC is constant.
fn host_tsc_khz() -> Option<u64> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let constant = cpuinfo
        .lines()
        .any(|l| l.starts_with("flags") && l.split_whitespace().any(|f| f == "constant_tsc"));
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (constant && mhz > 0.0).then_some((mhz * 1000.0) as u64)
}

/// Longest Unix socket path the kernel accepts.
const MAX_SOCKET_PATH: usize = 107;

/// The descriptor number a tap device is handed to QEMU at.
const TAP_FD: i32 = 3;

/// QEMU's seccomp filter: no obsolete system calls, no privilege changes, no new processes, no
/// scheduler or CPU-affinity changes.
pub(crate) const SECCOMP: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// fdset ids of descriptors passed for migrations (one at a time per VM).
static NEXT_FDSET: AtomicU64 = AtomicU64::new(1);

impl Qemu {
    /// A backend running the given QEMU binary, unconfined (see [`Qemu::confined`]).
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        let binary = binary.into();
        let binary = if binary.components().count() > 1 {
            binary
        } else {
            std::env::var_os("PATH")
                .and_then(|p| std::env::split_paths(&p).map(|d| d.join(&binary)).find(|p| p.is_file()))
                .unwrap_or(binary)
        };
        Self {
            binary,
            host_tsc_khz: host_tsc_khz(),
            confinement: Confinement::None,
        }
    }

    /// The same backend with its VMs confined as given.
    pub fn confined(mut self, confinement: Confinement) -> Self {
        self.confinement = confinement;
        self
    }

    /// The kernel command line of a guest booting the sandbox kernel with `accel`: root on
    /// `/dev/vda`, the serial console, the clock settings TCG needs, and with `network` the
    /// agent's fixed address (see [`crate::Network::GUEST_CONFIG`]).
    pub fn guest_cmdline(&self, accel: Accel, hostname: &str, network: bool, extra: &str) -> String {
        let clock_args = match accel {
            Accel::Kvm => String::new(),
            // microvm has no HPET, and under TCG the kernel's TSC calibration against the PIT
            // fails whenever the host is busy; the guest then marks the TSC unstable and hangs
            // waiting for timer ticks. A TCG guest's TSC runs at the host's TSC rate, so tell
            // the kernel that rate, and skip the delay-loop calibration too.
            _ => format!(
                " tsc=reliable lpj=8000000{}",
                self.host_tsc_khz
                    .map(|k| format!(" tsc_early_khz={k}"))
                    .unwrap_or_default()
            ),
        };
        let net_arg = if network {
            format!(" viv.net={}", crate::Network::GUEST_CONFIG)
        } else {
            String::new()
        };
        format!(
            "console=ttyS0 root=/dev/vda rootfstype=ext4 panic=-1 reboot=t quiet{clock_args}{net_arg} viv.hostname={hostname} {extra}"
        )
        .trim_end()
        .to_owned()
    }

    /// The full argument list for `spec`.
    pub fn arguments(&self, spec: &VmSpec) -> Vec<String> {
        let mem = spec.memory_mib;
        let (accel, cpu) = spec.accel.qemu_accel_and_cpu();
        let cmdline = self.guest_cmdline(spec.accel, &spec.name, spec.network.is_some(), &spec.extra_cmdline);
        let path = |p: &Path| p.display().to_string();
        let mut args: Vec<String> = vec![
            "-name".into(),
            spec.name.clone(),
            "-M".into(),
            "microvm,x-option-roms=off,rtc=on,memory-backend=mem".into(),
            // qboot loads the kernel and initramfs from fw_cfg itself and jumps to it: the
            // fastest firmware, and one that needs no option ROMs (microvm's default SeaBIOS
            // build boots `-kernel` only through them).
            "-bios".into(),
            "qboot.rom".into(),
            "-accel".into(),
            accel.into(),
            "-cpu".into(),
            cpu.into(),
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{mem}M"),
            "-object".into(),
            match &spec.memory {
                GuestMemory::SharedFile(file) => {
                    format!(
                        "memory-backend-file,id=mem,size={mem}M,mem-path={},share=on",
                        path(file)
                    )
                }
                // Opened read-only (the file is a template's, shared by every clone), mapped
                // privately and writable (`rom=off`): writes land in the clone's own pages.
                // Mapped at a 2 MiB boundary, so the file's 2 MiB pages (`huge_pages.rs`) are
                // mapped whole (QEMU aligns a file to its page size, 4 KiB on tmpfs, otherwise).
                GuestMemory::PrivateFile(file) => {
                    let align = if mem.is_multiple_of(2) { ",align=2M" } else { "" };
                    format!(
                        "memory-backend-file,id=mem,size={mem}M,mem-path={},share=off,readonly=on,rom=off{align}",
                        path(file)
                    )
                }
                GuestMemory::Anonymous => format!("memory-backend-ram,id=mem,size={mem}M"),
            },
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            // Appending, so that the server can cut a log grown past its cap and QEMU goes on
            // at the new end (see the server's console cap).
            "-chardev".into(),
            format!("file,id=console,path={},append=on", path(&spec.console_log())),
            "-serial".into(),
            "chardev:console".into(),
            "-chardev".into(),
            format!("socket,id=agent,path={},server=on,wait=off", path(&spec.agent_socket())),
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            "-device".into(),
            "virtserialport,chardev=agent,name=vivarium.agent,id=agentport".into(),
            "-blockdev".into(),
            format!(
                "driver=qcow2,node-name=root,discard=unmap,file.driver=file,file.filename={}",
                path(&spec.root_disk)
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", path(&spec.control_socket())),
        ];
        if !matches!(self.confinement, Confinement::None) {
            args.extend(["-sandbox".into(), SECCOMP.into()]);
        }
        // guest_announce=off: after a restore the device otherwise asks the guest to announce
        // itself, and in about half the restores the guest then lost the host's first channel
        // connection (a 2 s probe timeout per create). QEMU still announces the address itself.
        let netdev = match &spec.network {
            None => None,
            Some(crate::Network::User { internet }) => Some(format!(
                "user,id=net0,restrict={}",
                if *internet { "off" } else { "on" }
            )),
            Some(crate::Network::Tap { .. }) => Some(format!("tap,id=net0,fd={TAP_FD}")),
        };
        if let Some(netdev) = netdev {
            args.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56,guest_announce=off".into(),
            ]);
        }
        // A restored guest's memory holds its booted kernel, and nothing reads `fw_cfg` again
        // (`-no-reboot`): without `-kernel` and `-initrd` QEMU keeps no ~14 MiB copy of them.
        if spec.restore_from.is_some() {
            args.extend(["-incoming".into(), "defer".into()]);
        } else {
            args.extend([
                "-kernel".into(),
                path(&spec.kernel),
                "-initrd".into(),
                path(&spec.initramfs),
                "-append".into(),
                cmdline,
            ]);
        }
        args
    }

    fn check(&self, spec: &VmSpec) -> Result<(), LaunchError> {
        if !self.binary.is_file() {
            return Err(LaunchError::MissingBinary {
                binary: self.binary.display().to_string(),
                package: "qemu-system-x86".into(),
            });
        }
        if spec.accel == Accel::Kvm
            && std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_err()
        {
            return Err(LaunchError::AccelUnavailable(Accel::Kvm));
        }
        for socket in [spec.agent_socket(), spec.control_socket()] {
            if socket.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(LaunchError::Startup(format!(
                    "socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter data directory",
                    socket.display()
                )));
            }
        }
        Ok(())
    }

    /// The command that starts QEMU for `spec` as this backend confines it, and the jail it
    /// holds (to be released if the start fails).
    fn command(
        &self,
        spec: &VmSpec,
        log: &std::fs::File,
        tap: Option<&OwnedFd>,
    ) -> Result<(std::process::Command, Option<JailResources>), LaunchError> {
        let args = self.arguments(spec);
        let keep_fds = if tap.is_some() { vec![TAP_FD] } else { Vec::new() };
        let (mut command, jail) = match &self.confinement {
            Confinement::Jail(config) => {
                let jail = JailResources::allocate(config, spec)?;
                let built = jail
                    .hand_over(spec)
                    .and_then(|()| jail.spec(spec, &self.binary, args, keep_fds));
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
        let io = |e: std::io::Error| LaunchError::Startup(format!("opening the VM's log: {e}"));
        command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io)?)
            .stderr(log.try_clone().map_err(io)?);
        let tap_fd = tap.map(|t| t.as_raw_fd());
        let jailed = jail.is_some();
        let no_new_privs = matches!(self.confinement, Confinement::Seccomp);
        // SAFETY: runs in the child between fork and exec and calls only async-signal-safe
        // functions (setsid, dup2, fcntl, prctl) on integers; the tap descriptor stays open in
        // the parent until spawn returns (the caller holds it).
        unsafe {
            command.pre_exec(move || {
                // The jailer starts its own session; an unjailed QEMU gets one here, so that
                // signals meant for the server's process group never reach it.
                if !jailed && libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = tap_fd {
                    if fd == TAP_FD {
                        if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    } else if libc::dup2(fd, TAP_FD) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if no_new_privs && libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok((command, jail))
    }

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, LaunchError> {
        self.check(spec)?;
        let stderr_log = spec.run_dir.join("qemu.log");
        let log = std::fs::File::create(&stderr_log)
            .map_err(|e| LaunchError::Startup(format!("creating {}: {e}", stderr_log.display())))?;
        let tap = match &spec.network {
            Some(crate::Network::Tap { netns, ifname }) => Some(open_tap(netns, ifname).map_err(|e| {
                LaunchError::Startup(format!("opening tap device {ifname} in {}: {e}", netns.display()))
            })?),
            _ => None,
        };
        let (mut command, jail) = self.command(spec, &log, tap.as_ref())?;
        let process = match VmProcess::spawn(&mut command) {
            Ok(process) => Arc::new(process),
            Err(source) => {
                if let Some(jail) = &jail {
                    jail.release();
                }
                return Err(LaunchError::Spawn {
                    binary: self.binary.display().to_string(),
                    source,
                });
            }
        };
        drop(tap);
        drop(command);
        let fail = |reason: String| {
            let process = process.clone();
            let jail = &jail;
            let stderr_log = &stderr_log;
            async move {
                let _ = process.signal(libc::SIGKILL);
                process.exited().await;
                if let Some(jail) = jail {
                    jail.release();
                }
                let log = std::fs::read_to_string(stderr_log).unwrap_or_default();
                LaunchError::Startup(format!("{reason}. QEMU said: {}", log.trim()))
            }
        };
        let qmp = match connect_qmp(&spec.control_socket(), &process).await {
            Ok(qmp) => Arc::new(qmp),
            Err(reason) => return Err(fail(reason).await),
        };
        // Subscribe before the guest runs, so no event (the agent port opening) is missed.
        let events = qmp.events();
        if let Some(from) = &spec.restore_from {
            if let Err(err) = restore(&qmp, from, process.identity().pid).await {
                return Err(fail(format!("restoring {}: {err}", from.state.display())).await);
            }
        }
        let uid = jail.as_ref().map_or_else(current_uid, |j| j.uid);
        let vm = QemuVm::supervised(
            process,
            qmp,
            events,
            jail,
            uid,
            0,
            false,
            spec.console_log(),
            stderr_log,
        );
        tracing::debug!(name = %spec.name, pid = vm.identity().pid, "QEMU started");
        Ok(Box::new(vm))
    }

    /// Takes over VM `vm`; when that fails, its process is gone or killed and what its jail
    /// held is freed, since no handle will ever release it.
    async fn take_over(&self, vm: &Adoption) -> Result<Adopted, AdoptError> {
        let result = self.try_take_over(vm).await;
        if result.is_err() {
            self.release_failed_adoption(vm).await;
        }
        result
    }

    /// Frees what the jail of `vm`, whose adoption failed, held once its process is gone.
    pub(crate) async fn release_failed_adoption(&self, vm: &Adoption) {
        if let Confinement::Jail(config) = &self.confinement {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline
                && crate::process::start_time(vm.identity.pid) == Some(vm.identity.start_time)
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let config = config.clone();
            let vm_id = vm.vm_id.clone();
            let _ = tokio::task::spawn_blocking(move || JailResources::release_gone(&config, &vm_id)).await;
        }
    }

    /// Finds the process of `vm`, its jail and its QMP socket (events subscribed to from the
    /// start); a process that runs but does not answer is killed.
    pub(crate) async fn reconnect(&self, vm: &Adoption) -> Result<Reconnected, AdoptError> {
        let socket = vm.control_socket();
        let process = match VmProcess::adopt(vm.identity, &socket) {
            Ok(Some(process)) => Arc::new(process),
            Ok(None) => return Err(AdoptError::Gone),
            Err(err) => return Err(AdoptError::Unresponsive(format!("watching its process: {err}"))),
        };
        let uid = crate::process::uid_of(vm.identity.pid).unwrap_or_else(current_uid);
        let jail = match &self.confinement {
            Confinement::Jail(config) => Some(JailResources::found(config, &vm.vm_id, uid)),
            _ => None,
        };
        let qmp = match tokio::time::timeout(STARTUP_TIMEOUT, Qmp::connect(&socket)).await {
            Ok(Ok(qmp)) => Arc::new(qmp),
            Ok(Err(err)) => return Err(unresponsive(&process, err.to_string())),
            Err(_) => return Err(unresponsive(&process, format!("no answer within {STARTUP_TIMEOUT:?}"))),
        };
        let events = qmp.events();
        Ok(Reconnected {
            process,
            qmp,
            events,
            jail,
            uid,
        })
    }

    async fn try_take_over(&self, vm: &Adoption) -> Result<Adopted, AdoptError> {
        let Reconnected {
            process,
            qmp,
            events,
            jail,
            uid,
        } = self.reconnect(vm).await?;
        let status = qmp
            .execute("query-status", None)
            .await
            .map_err(|e| unresponsive(&process, e.to_string()))?;
        let state = if status["running"].as_bool() == Some(true) {
            AdoptedState::Running
        } else {
            AdoptedState::Stopped
        };
        // The node the guest writes to names how many times its disk was swapped (`root`,
        // `root-1`, ...), which names the next swap's node.
        let swaps = top_block_node(&qmp)
            .await
            .map(|(node, _)| node.strip_prefix("root-").and_then(|n| n.parse().ok()).unwrap_or(0))
            .unwrap_or(0);
        let run_dir = &vm.run_dir;
        let adopted = QemuVm::supervised(
            process,
            qmp,
            events,
            jail,
            uid,
            swaps,
            true,
            run_dir.join("console.log"),
            run_dir.join("qemu.log"),
        );
        tracing::info!(vm = %vm.vm_id, identity = %vm.identity, ?state, "took over a running VM");
        Ok((Box::new(adopted), state))
    }

    fn orphans(&self, run_root: &Path, keep: &dyn Fn(&str) -> bool) -> Vec<String> {
        let mut killed = Vec::new();
        let mut dying: Vec<ProcessIdentity> = Vec::new();
        if let Confinement::Jail(config) = &self.confinement {
            if let Some(tree) = &config.cgroups {
                tree.remove_stale_siblings(Duration::from_secs(600));
                for name in tree.children() {
                    if keep(&name) {
                        continue;
                    }
                    if let Some(cgroup) = tree.get(&name) {
                        let processes = cgroup.processes();
                        if !processes.is_empty() {
                            tracing::warn!(vm = %name, "killing a VM no sandbox owns");
                            killed.push(name.clone());
                        }
                        dying.extend(processes.into_iter().filter_map(|pid| {
                            Some(ProcessIdentity {
                                pid,
                                start_time: crate::process::start_time(pid)?,
                            })
                        }));
                        cgroup.kill_all();
                        let _ = cgroup.remove();
                    }
                }
            }
        }
        // VMs without a cgroup (unjailed, or on a host without cgroups): by command line.
        let marker = format!("{}/", run_root.display());
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            let Some(cmdline) = crate::process::command_line(pid) else {
                continue;
            };
            if !cmdline.starts_with(&*self.binary.to_string_lossy()) && !cmdline.starts_with("qemu-system") {
                continue;
            }
            let Some(rest) = cmdline.split(&marker).nth(1) else {
                continue;
            };
            let id = rest.split('/').next().unwrap_or_default().to_owned();
            if id.is_empty() || keep(&id) {
                continue;
            }
            if let Some(start_time) = crate::process::start_time(pid) {
                let identity = ProcessIdentity { pid, start_time };
                if let Ok(Some(process)) = VmProcess::adopt(identity, Path::new(&marker)) {
                    tracing::warn!(vm = %id, pid, "killing a VM no sandbox owns");
                    let _ = process.signal(libc::SIGKILL);
                    killed.push(id);
                    dying.push(identity);
                }
            }
        }
        // Their uids are free once they are gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && dying
                .iter()
                .any(|p| crate::process::start_time(p.pid) == Some(p.start_time))
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        // Uid records of VMs that are gone: this server's that it does not keep, and other
        // servers' once they are old enough not to belong to a VM being started right now.
        if let Confinement::Jail(config) = &self.confinement {
            let prefix = format!("{} ", config.key);
            let _ = config
                .uids
                .remove_stale(|_, owner, age| match owner.strip_prefix(&prefix) {
                    Some(id) => keep(id),
                    None => age < Duration::from_secs(600),
                });
        }
        killed.sort();
        killed.dedup();
        killed
    }
}

/// A VM's process, jail and QMP connection found again after a server restart.
pub(crate) struct Reconnected {
    pub(crate) process: Arc<VmProcess>,
    pub(crate) qmp: Arc<Qmp>,
    pub(crate) events: tokio::sync::broadcast::Receiver<serde_json::Value>,
    pub(crate) jail: Option<JailResources>,
    pub(crate) uid: u32,
}

/// Kills a process taken over that cannot be controlled, and says why.
pub(crate) fn unresponsive(process: &VmProcess, reason: String) -> AdoptError {
    let _ = process.signal(libc::SIGKILL);
    AdoptError::Unresponsive(reason)
}

pub(crate) fn current_uid() -> u32 {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn confinement(&self) -> String {
        self.confinement.describe()
    }

    fn launch<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, LaunchError>> {
        self.start(spec).boxed()
    }

    fn adopt<'a>(&'a self, vm: &'a Adoption) -> BoxFuture<'a, Result<Adopted, AdoptError>> {
        self.take_over(vm).boxed()
    }

    fn remove_orphans(&self, run_root: &Path, keep: &dyn Fn(&str) -> bool) -> Vec<String> {
        self.orphans(run_root, keep)
    }

    fn release_host(&self) {
        if let Confinement::Jail(config) = &self.confinement {
            if let Some(tree) = &config.cgroups {
                tree.remove_if_empty();
            }
        }
    }
}

/// Opens tap device `ifname` of the network namespace at `netns` (from a short-lived thread that
/// joins the namespace; the descriptor stays bound to that namespace's device).
fn open_tap(netns: &Path, ifname: &str) -> std::io::Result<OwnedFd> {
    let namespace = std::fs::File::open(netns)?;
    if ifname.len() >= libc::IFNAMSIZ {
        return Err(std::io::Error::other(format!("interface name {ifname} is too long")));
    }
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns on a descriptor this function keeps open; it changes only this
                // thread's namespace, and the thread ends right after.
                if unsafe { libc::setns(namespace.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let tun = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/net/tun")?;
                // SAFETY: an all-zero ifreq is valid; the name and flags are set below.
                let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
                for (slot, byte) in request.ifr_name.iter_mut().zip(ifname.bytes()) {
                    *slot = byte as libc::c_char;
                }
                request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
                // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across the call.
                if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(OwnedFd::from(tun))
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the tap thread panicked")))
    })
}

pub(crate) async fn connect_qmp(socket: &Path, process: &VmProcess) -> Result<Qmp, String> {
    let start = Instant::now();
    let exited = process.exited();
    tokio::pin!(exited);
    loop {
        if socket.exists() {
            match Qmp::connect(socket).await {
                Ok(qmp) => return Ok(qmp),
                Err(err) if start.elapsed() > STARTUP_TIMEOUT => return Err(err.to_string()),
                Err(_) => {}
            }
        }
        if start.elapsed() > STARTUP_TIMEOUT {
            return Err(format!("no QMP socket after {STARTUP_TIMEOUT:?}"));
        }
        tokio::select! {
            status = &mut exited => {
                return Err(format!("QEMU exited at once ({})", status.unwrap_or_else(|| "status unknown".into())));
            }
            () = tokio::time::sleep(Duration::from_millis(2)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(network: Option<crate::Network>) -> VmSpec {
        VmSpec {
            vm_id: "t".into(),
            name: "t".into(),
            run_dir: "/run/x".into(),
            kernel: "/k".into(),
            initramfs: "/i".into(),
            root_disk: "/d.qcow2".into(),
            memory: GuestMemory::SharedFile("/dev/shm/m".into()),
            restore_from: None,
            vcpus: 2,
            memory_mib: 256,
            accel: Accel::Tcg,
            extra_cmdline: String::new(),
            network,
        }
    }

    #[test]
    fn tcg_arguments_carry_the_clock_workaround_and_blockdev() {
        let spec = spec(Some(crate::Network::User { internet: false }));
        let args = Qemu::default().arguments(&spec).join(" ");
        assert!(args.contains("-netdev user,id=net0,restrict=on"));
        assert!(args.contains("viv.net=10.0.2.15/24,10.0.2.2,10.0.2.3"));
        assert!(args.contains("tcg,thread=multi,tb-size=128"));
        // No fast-string copies: TCG runs `rep movsb` a byte at a time.
        assert!(args.contains("-cpu max,-erms,-fsrm "));
        assert!(args.contains("tsc=reliable"));
        assert!(args.contains("-blockdev driver=qcow2"));
        assert!(!args.contains("-drive"));
        assert!(args.contains("mem-path=/dev/shm/m,share=on"));
        // Unconfined (measurement only): no seccomp filter.
        assert!(!args.contains("-sandbox"));
    }

    #[test]
    fn a_boot_loads_the_kernel_and_a_restore_does_not() {
        let mut spec = spec(None);
        let boot = Qemu::default().arguments(&spec).join(" ");
        assert!(boot.contains("-kernel /k -initrd /i -append "));
        assert!(!boot.contains("-incoming"));
        spec.restore_from = Some(Restore {
            state: "/s".into(),
            opened: None,
            memory: SnapshotMemory::External,
            composed: None,
        });
        let restore = Qemu::default().arguments(&spec).join(" ");
        assert!(restore.ends_with("-incoming defer"), "{restore}");
        for loaded in ["-kernel", "-initrd", "-append"] {
            assert!(!restore.contains(loaded), "{restore}");
        }
    }

    #[test]
    fn confined_qemu_gets_seccomp_a_tap_descriptor_and_read_only_template_memory() {
        let mut spec = spec(Some(crate::Network::Tap {
            netns: "/run/netns/x".into(),
            ifname: "tap0".into(),
        }));
        spec.memory = GuestMemory::PrivateFile("/dev/shm/t.mem".into());
        let args = Qemu::default()
            .confined(Confinement::Seccomp)
            .arguments(&spec)
            .join(" ");
        assert!(args.contains(&format!("-sandbox {SECCOMP}")));
        assert!(args.contains("-netdev tap,id=net0,fd=3"));
        assert!(args.contains("mem-path=/dev/shm/t.mem,share=off,readonly=on,rom=off,align=2M"));
    }
}
