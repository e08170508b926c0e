//! The QEMU backend: a `microvm` machine with virtio-mmio devices, controlled over QMP.
//!
//! Devices: the root disk as a `-blockdev` qcow2 overlay on `virtio-blk-device` (`-blockdev`
//! rather than `-drive`, because only that form survives migration, which snapshots use), the
//! agent channel as a virtio-serial port backed by a Unix socket, the serial console written to
//! `console.log`, and guest memory as a `memory-backend-file` so it can later be shared with
//! snapshots.

use std::os::fd::AsRawFd as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt as _;
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

use crate::qmp::Qmp;
use crate::{
    Accel, GuestMemory, LaunchError, Restore, SnapshotMemory, Vm, VmError, VmExit, VmSpec, Vmm, STARTUP_TIMEOUT,
};

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: PathBuf,
    /// The host's TSC frequency, which a TCG guest's TSC runs at.
    host_tsc_khz: Option<u64>,
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

impl Qemu {
    /// A backend running the given QEMU binary.
    pub fn with_binary(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            host_tsc_khz: host_tsc_khz(),
        }
    }

    /// The full argument list for `spec`.
    pub fn arguments(&self, spec: &VmSpec) -> Vec<String> {
        let mem = spec.memory_mib;
        let (accel, cpu, clock_args) = match spec.accel {
            Accel::Kvm => ("kvm".to_owned(), "host", String::new()),
            // microvm has no HPET, and under TCG the kernel's TSC calibration against the PIT
            // fails whenever the host is busy; the guest then marks the TSC unstable and hangs
            // waiting for timer ticks. A TCG guest's TSC runs at the host's TSC rate, so tell
            // the kernel that rate, and skip the delay-loop calibration too.
            _ => (
                "tcg,thread=multi,tb-size=128".to_owned(),
                "max",
                format!(
                    " tsc=reliable lpj=8000000{}",
                    self.host_tsc_khz
                        .map(|k| format!(" tsc_early_khz={k}"))
                        .unwrap_or_default()
                ),
            ),
        };
        let net_arg = match spec.network {
            Some(_) => format!(" viv.net={}", crate::Network::GUEST_CONFIG),
            None => String::new(),
        };
        let cmdline = format!(
            "console=ttyS0 root=/dev/vda rootfstype=ext4 panic=-1 reboot=t quiet{clock_args}{net_arg} viv.hostname={} {}",
            spec.name, spec.extra_cmdline
        );
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
            accel,
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
                GuestMemory::PrivateFile(file) => {
                    format!(
                        "memory-backend-file,id=mem,size={mem}M,mem-path={},share=off",
                        path(file)
                    )
                }
                GuestMemory::Anonymous => format!("memory-backend-ram,id=mem,size={mem}M"),
            },
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            path(&spec.kernel),
            "-initrd".into(),
            path(&spec.initramfs),
            "-append".into(),
            cmdline.trim_end().to_owned(),
            "-serial".into(),
            format!("file:{}", path(&spec.console_log())),
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
        // guest_announce=off: after a restore the device otherwise asks the guest to announce
        // itself, and in about half the restores the guest then lost the host's first channel
        // connection (a 2 s probe timeout per create). QEMU still announces the address itself.
        let netdev = match &spec.network {
            None => None,
            Some(crate::Network::User { internet }) => Some(format!(
                "user,id=net0,restrict={}",
                if *internet { "off" } else { "on" }
            )),
            Some(crate::Network::Tap { ifname, .. }) => {
                Some(format!("tap,id=net0,ifname={ifname},script=no,downscript=no"))
            }
        };
        if let Some(netdev) = netdev {
            args.extend([
                "-netdev".into(),
                netdev,
                "-device".into(),
                "virtio-net-device,netdev=net0,mac=52:54:00:12:34:56,guest_announce=off".into(),
            ]);
        }
        if spec.restore_from.is_some() {
            args.extend(["-incoming".into(), "defer".into()]);
        }
        args
    }

    fn check(&self, spec: &VmSpec) -> Result<(), LaunchError> {
        let found = if self.binary.components().count() > 1 {
            self.binary.is_file()
        } else {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(&self.binary).is_file()))
                .unwrap_or(false)
        };
        if !found {
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

    async fn start(&self, spec: &VmSpec) -> Result<Box<dyn Vm>, LaunchError> {
        self.check(spec)?;
        let stderr_log = spec.run_dir.join("qemu.log");
        let log = std::fs::File::create(&stderr_log)
            .map_err(|e| LaunchError::Startup(format!("creating {}: {e}", stderr_log.display())))?;
        let mut command = Command::new(&self.binary);
        command
            .args(self.arguments(spec))
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| LaunchError::Startup(e.to_string()))?)
            .stderr(log)
            .kill_on_drop(true);
        // A tap backend lives in a network namespace, which QEMU joins before it starts.
        let netns = match &spec.network {
            Some(crate::Network::Tap { netns, .. }) => Some(
                std::fs::File::open(netns)
                    .map_err(|e| LaunchError::Startup(format!("opening network namespace {}: {e}", netns.display())))?,
            ),
            _ => None,
        };
        let netns_fd = netns.as_ref().map(|f| f.as_raw_fd());
        // SAFETY: runs in the child before exec and only calls prctl and setns, which are
        // async-signal-safe; the namespace descriptor stays open in the parent until spawn
        // returns (`netns` lives past it) and is inherited by the forked child.
        unsafe {
            command.as_std_mut().pre_exec(move || {
                // Die with the server: no orphan VMs if it crashes.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(fd) = netns_fd {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|source| LaunchError::Spawn {
            binary: self.binary.display().to_string(),
            source,
        })?;
        drop(netns);
        let pid = child.id();
        let qmp = match connect_qmp(&spec.control_socket(), &mut child).await {
            Ok(qmp) => Arc::new(qmp),
            Err(reason) => {
                let _ = child.kill().await;
                let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                return Err(LaunchError::Startup(format!("{reason}. QEMU said: {}", log.trim())));
            }
        };
        // Subscribe before the guest runs, so no event (the agent port opening) is missed.
        let events = qmp.events();
        if let Some(from) = &spec.restore_from {
            if let Err(err) = restore(&qmp, from).await {
                let _ = child.kill().await;
                let log = std::fs::read_to_string(&stderr_log).unwrap_or_default();
                return Err(LaunchError::Startup(format!(
                    "restoring {}: {err}. QEMU said: {}",
                    from.state.display(),
                    log.trim()
                )));
            }
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel();
        // Whether the guest has its agent port open (a booted guest opens it once its agent runs).
        let (port_tx, port_rx) = watch::channel(false);
        tokio::spawn(supervise(
            child,
            events,
            kill_rx,
            exit_tx,
            port_tx,
            spec.console_log(),
            stderr_log,
        ));
        tracing::debug!(name = %spec.name, ?pid, "QEMU started");
        Ok(Box::new(QemuVm {
            pid,
            exit_rx,
            port_rx,
            kill_tx: Mutex::new(Some(kill_tx)),
            qmp,
            disk_swaps: tokio::sync::Mutex::new(0),
        }))
    }
}

impl Vmm for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn launch<'a>(&'a self, spec: &'a VmSpec) -> BoxFuture<'a, Result<Box<dyn Vm>, LaunchError>> {
        self.start(spec).boxed()
    }
}

async fn connect_qmp(socket: &Path, child: &mut Child) -> Result<Qmp, String> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("QEMU exited at once ({status})"));
        }
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
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits for the QEMU process to end, or kills it when asked (or when the handle is dropped),
/// and publishes why it stopped.
async fn supervise(
    mut child: Child,
    mut events: tokio::sync::broadcast::Receiver<serde_json::Value>,
    kill_rx: oneshot::Receiver<()>,
    exit_tx: watch::Sender<Option<VmExit>>,
    port_tx: watch::Sender<bool>,
    console_log: PathBuf,
    stderr_log: PathBuf,
) {
    let last_event = Arc::new(Mutex::new(None::<String>));
    let recorder = {
        let last_event = last_event.clone();
        tokio::spawn(async move {
            while let Ok(event) = events.recv().await {
                let name = event["event"].as_str().unwrap_or_default().to_owned();
                if name == "VSERPORT_CHANGE" && event["data"]["id"] == "agentport" {
                    let _ = port_tx.send(event["data"]["open"].as_bool().unwrap_or(false));
                }
                if matches!(name.as_str(), "SHUTDOWN" | "RESET" | "GUEST_PANICKED") {
                    let reason = event["data"]["reason"].as_str().unwrap_or_default().to_owned();
                    *last_event.lock().expect("event lock") = Some(format!("{name} {reason}").trim().to_owned());
                }
            }
        })
    };
    let (status, requested) = tokio::select! {
        status = child.wait() => (status, false),
        _ = kill_rx => {
            let _ = child.start_kill();
            (child.wait().await, true)
        }
    };
    recorder.abort();
    let mut reason = match &status {
        Ok(s) => format!("QEMU exited ({s})"),
        Err(e) => format!("QEMU could not be waited for: {e}"),
    };
    if !requested {
        if let Some(event) = last_event.lock().expect("event lock").take() {
            let what = match event.as_str() {
                e if e.contains("guest-reset") || e.contains("GUEST_PANICKED") => {
                    "the guest kernel panicked or rebooted"
                }
                e if e.contains("guest-shutdown") => "the guest shut down",
                _ => "",
            };
            reason = format!(
                "{reason} after {event}{}",
                if what.is_empty() {
                    String::new()
                } else {
                    format!(": {what}")
                }
            );
        }
        let stderr = std::fs::read_to_string(&stderr_log).unwrap_or_default();
        if !stderr.trim().is_empty() {
            reason.push_str(&format!("; QEMU said: {}", tail(&stderr, 3)));
        }
        let console = std::fs::read_to_string(&console_log).unwrap_or_default();
        if !console.trim().is_empty() {
            reason.push_str(&format!("; console: {}", tail(&console, 5)));
        }
    }
    let _ = exit_tx.send(Some(VmExit { requested, reason }));
}

/// With [`SnapshotMemory::External`], guest memory lives in a shared file the snapshot does not
/// copy: the migration stream carries device state only. Source and destination must agree.
async fn set_memory_mode(qmp: &Qmp, memory: SnapshotMemory) -> Result<(), crate::qmp::QmpError> {
    let external = memory == SnapshotMemory::External;
    let caps = serde_json::json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": external }] });
    qmp.execute("migrate-set-capabilities", Some(caps)).await.map(|_| ())
}

/// Polls `query-migrate` until the migration completes or fails.
async fn wait_migration(qmp: &Qmp) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let status = qmp.execute("query-migrate", None).await.map_err(|e| e.to_string())?;
        match status["status"].as_str().unwrap_or_default() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(status["error-desc"].as_str().unwrap_or("migration failed").to_owned());
            }
            _ if start.elapsed() > Duration::from_secs(60) => return Err("migration did not finish in 60 s".into()),
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Loads device state into a QEMU started with `-incoming defer`, then lets the guest run.
async fn restore(qmp: &Qmp, from: &Restore) -> Result<(), String> {
    let state = &from.state;
    if !state.is_file() {
        return Err(format!("{} does not exist", state.display()));
    }
    set_memory_mode(qmp, from.memory).await.map_err(|e| e.to_string())?;
    tracing::debug!(state = %state.display(), "loading device state");
    let uri = format!("exec:cat {}", shell_quote(state));
    qmp.execute("migrate-incoming", Some(serde_json::json!({ "uri": uri })))
        .await
        .map_err(|e| e.to_string())?;
    wait_migration(qmp).await?;
    tracing::debug!("device state loaded");
    qmp.execute("cont", None).await.map_err(|e| e.to_string())?;
    tracing::debug!("restored VM running");
    Ok(())
}

/// Waits until process `pid` has no children left (the helpers of `exec:` migrations).
async fn wait_for_children(pid: u32, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    let parent = pid.to_string();
    loop {
        let busy = std::fs::read_dir("/proc")
            .map_err(|e| e.to_string())?
            .flatten()
            .any(|entry| {
                let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
                // The parent pid is the second field after the parenthesized command name.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                    == Some(parent.as_str())
            });
        if !busy {
            return Ok(());
        }
        if start.elapsed() > limit {
            return Err(format!("the snapshot writer did not finish within {limit:?}"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Quotes a path for the shell QEMU runs `exec:` migration commands with.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

struct QemuVm {
    pid: Option<u32>,
    exit_rx: watch::Receiver<Option<VmExit>>,
    port_rx: watch::Receiver<bool>,
    kill_tx: Mutex<Option<oneshot::Sender<()>>>,
    qmp: Arc<Qmp>,
    /// How many times the root disk was replaced; names the block node the guest writes to.
    disk_swaps: tokio::sync::Mutex<u32>,
}

impl Vm for QemuVm {
    fn pid(&self) -> Option<u32> {
        self.pid
    }

    fn exit(&self) -> watch::Receiver<Option<VmExit>> {
        self.exit_rx.clone()
    }

    fn snapshot<'a>(&'a self, state_file: &'a Path, memory: SnapshotMemory) -> BoxFuture<'a, Result<(), VmError>> {
        async move {
            self.qmp.execute("stop", None).await?;
            set_memory_mode(&self.qmp, memory).await?;
            // The default limit (128 MiB/s) is meant for live migration over a network; a
            // snapshot of a stopped VM into a local file should go as fast as the disk allows.
            let params = serde_json::json!({ "max-bandwidth": i64::MAX / 2 });
            self.qmp.execute("migrate-set-parameters", Some(params)).await?;
            let uri = format!("exec:cat > {}", shell_quote(state_file));
            self.qmp
                .execute("migrate", Some(serde_json::json!({ "uri": uri })))
                .await?;
            let started = Instant::now();
            wait_migration(&self.qmp).await.map_err(VmError::Snapshot)?;
            tracing::debug!(ms = started.elapsed().as_millis() as u64, "migration completed");
            // QEMU reports completion once it has written the stream into the pipe; the `cat`
            // it spawned may still be writing the file.
            if let Some(pid) = self.pid {
                wait_for_children(pid, Duration::from_secs(30))
                    .await
                    .map_err(VmError::Snapshot)?;
            }
            tracing::debug!(ms = started.elapsed().as_millis() as u64, "state written");
            Ok(())
        }
        .boxed()
    }

    fn pause(&self) -> BoxFuture<'_, Result<(), VmError>> {
        async move {
            self.qmp.execute("stop", None).await?;
            Ok(())
        }
        .boxed()
    }

    fn resume(&self) -> BoxFuture<'_, Result<(), VmError>> {
        async move {
            self.qmp.execute("cont", None).await?;
            Ok(())
        }
        .boxed()
    }

    fn replace_root_disk<'a>(&'a self, overlay: &'a Path) -> BoxFuture<'a, Result<(), VmError>> {
        async move {
            let mut swaps = self.disk_swaps.lock().await;
            // `-blockdev node-name=root` on the command line, then `root-1`, `root-2`, ...
            let top = match *swaps {
                0 => "root".to_owned(),
                n => format!("root-{n}"),
            };
            let node = format!("root-{}", *swaps + 1);
            let add = serde_json::json!({
                "driver": "qcow2",
                "node-name": node,
                "discard": "unmap",
                "file": { "driver": "file", "filename": overlay.display().to_string() },
                // The current root disk becomes the backing node through blockdev-snapshot.
                "backing": null,
            });
            self.qmp.execute("blockdev-add", Some(add)).await?;
            let swap = serde_json::json!({ "node": top, "overlay": node });
            if let Err(err) = self.qmp.execute("blockdev-snapshot", Some(swap)).await {
                let _ = self
                    .qmp
                    .execute("blockdev-del", Some(serde_json::json!({ "node-name": node })))
                    .await;
                return Err(err.into());
            }
            *swaps += 1;
            Ok(())
        }
        .boxed()
    }

    fn agent_port_open(&self) -> watch::Receiver<bool> {
        self.port_rx.clone()
    }

    fn kill(&self) -> BoxFuture<'_, Result<(), VmError>> {
        async move {
            if let Some(tx) = self.kill_tx.lock().expect("kill lock").take() {
                let _ = tx.send(());
            }
            let mut rx = self.exit_rx.clone();
            rx.wait_for(Option::is_some)
                .await
                .map_err(|_| VmError::Stopped("supervisor gone".into()))?;
            Ok(())
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcg_arguments_carry_the_clock_workaround_and_blockdev() {
        let spec = VmSpec {
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
            network: Some(crate::Network::User { internet: false }),
        };
        let args = Qemu::default().arguments(&spec).join(" ");
        assert!(args.contains("-netdev user,id=net0,restrict=on"));
        assert!(args.contains("viv.net=10.0.2.15/24,10.0.2.2,10.0.2.3"));
        assert!(args.contains("tcg,thread=multi,tb-size=128"));
        assert!(args.contains("tsc=reliable"));
        assert!(args.contains("-blockdev driver=qcow2"));
        assert!(!args.contains("-drive"));
        assert!(args.contains("mem-path=/dev/shm/m,share=on"));
    }
}
