//! A running QEMU: the handle the server holds ([`QemuVm`], the [`Vm`] trait), the supervisor
//! task that watches its process, and the saved-state paths (snapshot, restore and the memory
//! diff chain fed through a pipe).
//!
//! Invariants: the supervisor is the only one to reap the process and release its jail, after
//! the process is gone; a handle dropped without [`Vm::detach`] kills the process; states go
//! both ways through descriptors the server opens and passes over QMP (a jailed QEMU opens no
//! file of the server's).

use super::*;
use crate::Composed;

/// The block node the guest's disk writes to and its file.
pub(super) async fn top_block_node(qmp: &Qmp) -> Result<(String, PathBuf), VmError> {
    let blocks = qmp.execute("query-block", None).await?;
    let inserted = blocks
        .as_array()
        .and_then(|b| b.iter().find(|d| !d["inserted"].is_null()))
        .map(|d| &d["inserted"])
        .ok_or_else(|| VmError::Snapshot("the VM has no disk".into()))?;
    let node = inserted["node-name"].as_str().unwrap_or("root").to_owned();
    let file = inserted["file"]
        .as_str()
        .ok_or_else(|| VmError::Snapshot("the VM's disk has no file".into()))?;
    Ok((node, PathBuf::from(file)))
}

/// What the supervisor is told to do.
enum Control {
    Kill,
    Detach,
}

/// Waits for the QEMU process to end, or kills it when asked (or when the handle is dropped),
/// releases its jail once it is gone, and publishes why it stopped. Told to detach, it stops
/// watching and leaves process and jail alone.
#[allow(clippy::too_many_arguments)]
async fn supervise(
    process: Arc<VmProcess>,
    jail: Option<JailResources>,
    mut events: tokio::sync::broadcast::Receiver<serde_json::Value>,
    mut qmp_closed: watch::Receiver<bool>,
    control: oneshot::Receiver<Control>,
    exit_tx: watch::Sender<Option<VmExit>>,
    port_tx: watch::Sender<bool>,
    console_log: PathBuf,
    stderr_log: PathBuf,
) {
    let last_event = Arc::new(Mutex::new(None::<LastEvent>));
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let recorder = {
        let last_event = last_event.clone();
        tokio::spawn(async move {
            // Until told to stop; then what is still queued (QEMU's last events) is read too.
            use tokio::sync::broadcast::error::{RecvError, TryRecvError};
            let mut stopping = false;
            loop {
                let event = if stopping {
                    match events.try_recv() {
                        Ok(event) => event,
                        Err(TryRecvError::Lagged(_)) => continue,
                        Err(_) => break,
                    }
                } else {
                    tokio::select! {
                        event = events.recv() => match event {
                            Ok(event) => event,
                            Err(RecvError::Lagged(_)) => continue,
                            Err(RecvError::Closed) => break,
                        },
                        _ = &mut stop_rx => {
                            stopping = true;
                            continue;
                        }
                    }
                };
                let name = event["event"].as_str().unwrap_or_default().to_owned();
                if name == "VSERPORT_CHANGE" && event["data"]["id"] == "agentport" {
                    let _ = port_tx.send(event["data"]["open"].as_bool().unwrap_or(false));
                }
                if let Some(event) = LastEvent::of(&event) {
                    let mut last = last_event.lock().expect("event lock");
                    // A panic stays the cause whatever follows it (the SHUTDOWN of
                    // `-action panic=exit-failure`, or a reset).
                    if !last.as_ref().is_some_and(|e| e.cause == ExitCause::GuestPanic) {
                        *last = Some(event);
                    }
                }
            }
        })
    };
    let (status, requested) = tokio::select! {
        status = process.exited() => (status, false),
        order = control => match order {
            Ok(Control::Detach) => {
                recorder.abort();
                return;
            }
            // Asked to, or the handle was dropped.
            Ok(Control::Kill) | Err(_) => {
                let _ = process.signal(libc::SIGKILL);
                (process.exited().await, true)
            }
        },
    };
    // QEMU's last events (the SHUTDOWN it sends before exiting) may still be on their way:
    // once its QMP connection is closed, all it sent is queued for the recorder, which reads
    // the rest and ends.
    let _ = tokio::time::timeout(Duration::from_secs(2), qmp_closed.wait_for(|closed| *closed)).await;
    let _ = stop_tx.send(());
    let _ = recorder.await;
    if let Some(jail) = jail {
        // Removing the cgroup may wait (up to 2 s) for the kernel to let go of it.
        let _ = tokio::task::spawn_blocking(move || jail.release()).await;
    }
    let mut reason = match &status {
        Some(s) => format!("QEMU exited ({s})"),
        None => "QEMU exited".to_owned(),
    };
    let last = last_event.lock().expect("event lock").take();
    let cause = exit_cause(requested, status.as_deref(), last.as_ref());
    if !requested {
        if let Some(LastEvent { text: event, .. }) = last {
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
    let _ = exit_tx.send(Some(VmExit {
        requested,
        reason,
        cause,
    }));
}

/// With [`SnapshotMemory::External`], guest memory lives in a shared file the snapshot does not
/// copy: the migration stream carries device state only. Source and destination must agree.
async fn set_memory_mode(qmp: &Qmp, memory: SnapshotMemory) -> Result<(), crate::qmp::QmpError> {
    let external = memory == SnapshotMemory::External;
    let caps = serde_json::json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": external }] });
    qmp.execute("migrate-set-capabilities", Some(caps)).await.map(|_| ())
}

/// Polls `query-migrate` until the migration completes or fails.
pub(crate) async fn wait_migration(qmp: &Qmp) -> Result<(), String> {
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

/// How often [`Writeback`] queues what QEMU has written.
const WRITEBACK_EVERY: Duration = Duration::from_millis(5);

/// Queues the disk's writeback of what QEMU has written to a state file so far, every
/// [`WRITEBACK_EVERY`], until dropped (`sync_file_range` with `SYNC_FILE_RANGE_WRITE`, which
/// starts writing the dirty pages and does not wait for them). A save's first pages then reach
/// the disk while QEMU is still scanning memory, and the `fdatasync` that makes the state durable
/// waits only for the tail. Errors are ignored: that sync reports them.
struct Writeback(Arc<AtomicBool>);

impl Writeback {
    fn start(file: &std::fs::File) -> Option<Self> {
        let file = file.try_clone().ok()?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        tokio::task::spawn_blocking(move || {
            while !stopped.load(Ordering::Relaxed) {
                // SAFETY: `file` is an open descriptor this closure owns; offset 0 and length 0
                // mean "to the end of the file"; the call touches no memory of ours.
                unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
                std::thread::sleep(WRITEBACK_EVERY);
            }
        });
        Some(Self(stop))
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Hands QEMU `file` as a one-descriptor fdset and returns the set's id, for a
/// `file:/dev/fdset/ID` migration URI. QEMU picks the descriptor by access mode, so it must be
/// opened read-only for a load and write-only for a save.
async fn pass_file(qmp: &Qmp, file: &std::fs::File) -> Result<u64, String> {
    let id = NEXT_FDSET.fetch_add(1, Ordering::Relaxed) % (1 << 30);
    qmp.pass_fdset(id, file.as_fd()).await.map_err(|e| e.to_string())?;
    Ok(id)
}

/// Drops fdset `id` from QEMU (the migration that used it is over).
async fn drop_fdset(qmp: &Qmp, id: u64) {
    let _ = qmp
        .execute("remove-fd", Some(serde_json::json!({ "fdset-id": id })))
        .await;
}

/// Loads device state into a QEMU (process `pid`) started with `-incoming defer`, then lets
/// the guest run.
pub(super) async fn restore(qmp: &Qmp, from: &Restore, pid: u32) -> Result<(), String> {
    let state = &from.state;
    let composer = match &from.composed {
        None => None,
        Some(Composed::Chain(chain)) => {
            let chain = chain.clone();
            Some(Box::new(move |out: std::io::PipeWriter| chain.compose(out)) as Composer)
        }
        Some(Composed::OverBase(over)) => {
            // The pages left out are those of the file this process compared them with: it
            // must be the one QEMU mapped, not a newer file at the same path.
            if !maps_file(pid, over.base_identity()) {
                return Err(format!(
                    "the memory file {} changed since the snapshot was taken",
                    over.base().display()
                ));
            }
            let over = over.clone();
            Some(Box::new(move |out: std::io::PipeWriter| {
                let stats = over.compose(out)?;
                tracing::debug!(
                    pages = stats.records,
                    loaded = stats.kept,
                    "whole state composed over its base"
                );
                Ok(())
            }) as Composer)
        }
    };
    let (file, writer) = match composer {
        None => {
            let file = match &from.opened {
                Some(file) => file.try_clone(),
                None => std::fs::File::open(state),
            };
            (file.map_err(|e| format!("opening {}: {e}", state.display()))?, None)
        }
        Some(compose) => {
            let (read, write) = std::io::pipe().map_err(|e| format!("creating a pipe: {e}"))?;
            // A larger pipe lets the composer and QEMU switch less often (best effort: the
            // default 64 KiB works too).
            // SAFETY: fcntl on a descriptor we own; no memory is passed.
            unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES) };
            // QEMU reads as this writes; when QEMU stops reading (it failed), the write fails.
            let writer = std::thread::spawn(move || compose(write));
            (std::fs::File::from(OwnedFd::from(read)), Some(writer))
        }
    };
    set_memory_mode(qmp, from.memory).await.map_err(|e| e.to_string())?;
    tracing::debug!(state = %state.display(), composed = writer.is_some(), "loading device state");
    let fdset = pass_file(qmp, &file).await;
    // QEMU holds its own copy now: ours would keep the pipe open if QEMU dies.
    drop(file);
    let fdset = fdset?;
    let loaded = async {
        qmp.execute(
            "migrate-incoming",
            Some(serde_json::json!({ "uri": format!("file:/dev/fdset/{fdset}") })),
        )
        .await
        .map_err(|e| e.to_string())?;
        wait_migration(qmp).await
    }
    .await;
    drop_fdset(qmp, fdset).await;
    // A load that completed read the whole composed stream (the writer may still fail on
    // bytes after QEMU's end marker: ignored). A failed load is explained by the writer's error
    // if it has one; a writer still blocked ends when the caller kills this QEMU.
    if let (Err(err), Some(writer)) = (&loaded, writer) {
        if writer.is_finished() {
            if let Ok(Err(composing)) = writer.join() {
                return Err(format!("{err} (composing the memory to load: {composing})"));
            }
        }
    }
    loaded?;
    tracing::debug!("device state loaded");
    qmp.execute("cont", None).await.map_err(|e| e.to_string())?;
    tracing::debug!("restored VM running");
    Ok(())
}

/// The size asked for the pipe a composed restore stream goes through (the default limit of
/// `/proc/sys/fs/pipe-max-size` for an unprivileged process too).
const PIPE_BYTES: libc::c_int = 1 << 20;

/// Writes the stream a restore composes into the pipe QEMU reads.
type Composer = Box<dyn FnOnce(std::io::PipeWriter) -> Result<(), crate::memdiff::DiffError> + Send>;

/// Whether process `pid` maps the file with device and inode `identity` (`/proc/PID/maps`
/// shows both for every file mapping, whatever the path looks like in its mount namespace).
fn maps_file(pid: u32, identity: (u64, u64)) -> bool {
    let Ok(maps) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else {
        return false;
    };
    let (dev, ino) = identity;
    let (major, minor) = (
        libc::major(dev as libc::dev_t) as u64,
        libc::minor(dev as libc::dev_t) as u64,
    );
    maps.lines().any(|line| {
        let mut fields = line.split_ascii_whitespace().skip(3);
        let (Some(device), Some(inode)) = (fields.next(), fields.next()) else {
            return false;
        };
        let Some((maj, min)) = device.split_once(':') else {
            return false;
        };
        inode.parse::<u64>().ok() == Some(ino)
            && u64::from_str_radix(maj, 16).ok() == Some(major)
            && u64::from_str_radix(min, 16).ok() == Some(minor)
    })
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

pub(crate) struct QemuVm {
    process: Arc<VmProcess>,
    uid: u32,
    exit_rx: watch::Receiver<Option<VmExit>>,
    port_rx: watch::Receiver<bool>,
    control: Mutex<Option<oneshot::Sender<Control>>>,
    pub(crate) qmp: Arc<Qmp>,
    /// How many times the root disk was replaced; names the block node the guest writes to.
    disk_swaps: tokio::sync::Mutex<u32>,
    /// The jail's owner of files this VM is given (none when not jailed).
    jail_uid: Option<u32>,
}

impl QemuVm {
    /// A handle on a running QEMU whose process a supervisor task now watches.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn supervised(
        process: Arc<VmProcess>,
        qmp: Arc<Qmp>,
        events: tokio::sync::broadcast::Receiver<serde_json::Value>,
        jail: Option<JailResources>,
        uid: u32,
        disk_swaps: u32,
        port_open: bool,
        console_log: PathBuf,
        stderr_log: PathBuf,
    ) -> Self {
        let (exit_tx, exit_rx) = watch::channel(None);
        let (control_tx, control_rx) = oneshot::channel();
        // Whether the guest has its agent port open (a booted guest opens it once its agent
        // runs; a VM taken over had it open long ago).
        let (port_tx, port_rx) = watch::channel(port_open);
        let jail_uid = jail.as_ref().map(|j| j.uid);
        tokio::spawn(supervise(
            process.clone(),
            jail,
            events,
            qmp.closed(),
            control_rx,
            exit_tx,
            port_tx,
            console_log,
            stderr_log,
        ));
        Self {
            process,
            uid,
            exit_rx,
            port_rx,
            control: Mutex::new(Some(control_tx)),
            qmp,
            disk_swaps: tokio::sync::Mutex::new(disk_swaps),
            jail_uid,
        }
    }

    fn order(&self, order: Control) {
        if let Some(tx) = self.control.lock().expect("control lock").take() {
            let _ = tx.send(order);
        }
    }
}

/// A handle dropped without a kill or a detach (a start abandoned when the server stops, say)
/// kills its QEMU at once, whether or not the supervisor task ever runs again: a VM nobody
/// holds must not outlive its server. The supervisor, if it runs, then releases the jail; if
/// not, the next server removes the stale cgroup and uid record.
impl Drop for QemuVm {
    fn drop(&mut self) {
        if self.control.lock().map(|c| c.is_some()).unwrap_or(true) {
            let _ = self.process.signal(libc::SIGKILL);
        }
    }
}

impl Vm for QemuVm {
    fn pid(&self) -> Option<u32> {
        Some(self.process.identity().pid)
    }

    fn identity(&self) -> ProcessIdentity {
        self.process.identity()
    }

    fn uid(&self) -> u32 {
        self.uid
    }

    fn detach(&self) {
        self.order(Control::Detach);
    }

    fn root_disk(&self) -> BoxFuture<'_, Result<PathBuf, VmError>> {
        async move { top_block_node(&self.qmp).await.map(|(_, file)| file) }.boxed()
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
            // Guest memory may be in it: the server's alone.
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(state_file)?;
            let started = Instant::now();
            let fdset = pass_file(&self.qmp, &file).await.map_err(VmError::Snapshot)?;
            let saved = async {
                self.qmp
                    .execute(
                        "migrate",
                        Some(serde_json::json!({ "uri": format!("file:/dev/fdset/{fdset}") })),
                    )
                    .await
                    .map_err(|e| VmError::Snapshot(e.to_string()))?;
                // The disk takes what QEMU has written while it writes the rest, so the
                // caller's sync waits only for the tail.
                let _writeback = Writeback::start(&file);
                wait_migration(&self.qmp).await.map_err(VmError::Snapshot)
            }
            .await;
            drop_fdset(&self.qmp, fdset).await;
            saved?;
            tracing::debug!(ms = started.elapsed().as_millis() as u64, "migration completed");
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
            if let Some(uid) = self.jail_uid {
                std::os::unix::fs::chown(overlay, Some(uid), Some(uid))?;
            }
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
            self.order(Control::Kill);
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
    fn a_process_maps_its_own_executable_and_not_another_inode() {
        use std::os::unix::fs::MetadataExt as _;
        let exe = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
        assert!(maps_file(std::process::id(), (exe.dev(), exe.ino())));
        assert!(!maps_file(std::process::id(), (exe.dev(), u64::MAX)));
        assert!(!maps_file(u32::MAX, (exe.dev(), exe.ino())));
    }
}
