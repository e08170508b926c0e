//! The handle of a running machine and its QMP operations, each with its own error type.

use std::collections::HashMap;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;

use super::{medium_node, MachineSpec};
use crate::qemu::QemuVm;
use crate::qmp::{Qmp, QmpError};
use crate::{ProcessIdentity, Vm as _, VmExit};

/// Whether a QMP failure means QEMU is gone (as opposed to a command it refused).
fn gone(err: &QmpError) -> bool {
    matches!(err, QmpError::Closed | QmpError::Io(_))
}

/// Whether `qdev` (a device id, or a QOM path such as `/machine/peripheral/ID/...`, as
/// `query-block` reports it) is device `id`.
pub(super) fn names_device(qdev: &str, id: &str) -> bool {
    qdev == id || qdev.split('/').skip_while(|p| *p != "peripheral").nth(1) == Some(id)
}

/// Defines an operation's error type: the machine stopped, or QEMU refused the command, plus
/// the operation's own variants.
macro_rules! operation_error {
    ($(#[$doc:meta])* $name:ident, $what:literal $(, $(#[$vdoc:meta])* $variant:ident($ty:ty) => $msg:literal)*) => {
        $(#[$doc])*
        #[derive(Debug, thiserror::Error)]
        pub enum $name {
            /// The machine is not running any more.
            #[error("cannot {}: the machine has stopped", $what)]
            Stopped,
            /// QEMU refused the command.
            #[error("cannot {}: {}", $what, .0)]
            Refused(QmpError),
            $($(#[$vdoc])* #[error($msg)] $variant($ty),)*
        }

        impl From<QmpError> for $name {
            fn from(err: QmpError) -> Self {
                if gone(&err) { Self::Stopped } else { Self::Refused(err) }
            }
        }
    };
}

operation_error!(
    /// Why the ACPI power button could not be pressed.
    PowerOffError, "press the power button"
);
operation_error!(
    /// Why a machine could not be paused.
    PauseError, "pause the machine"
);
operation_error!(
    /// Why a machine could not be resumed.
    ResumeError, "resume the machine"
);
operation_error!(
    /// Why QEMU could not be told to quit.
    QuitError, "quit"
);
operation_error!(
    /// Why a machine's status could not be read.
    StatusError, "read the machine's status"
);
operation_error!(
    /// Why a CD-ROM's medium could not be changed.
    MediumError, "change the medium",
    /// No CD-ROM drive has that id.
    UnknownDrive(String) => "the machine has no CD-ROM drive {0:?}",
    /// The ISO could not be opened.
    Open(std::io::Error) => "opening the ISO: {0}"
);
operation_error!(
    /// Why a CD-ROM could not be ejected.
    EjectError, "eject the medium",
    /// No CD-ROM drive has that id.
    UnknownDrive(String) => "the machine has no CD-ROM drive {0:?}"
);
operation_error!(
    /// Why a disk could not be resized.
    ResizeError, "resize the disk",
    /// No disk has that id.
    UnknownDisk(String) => "the machine has no disk {0:?}",
    /// The disk is read-only.
    ReadOnly(String) => "disk {0:?} is read-only"
);
operation_error!(
    /// Why a disk's I/O limits could not be read.
    IoLimitsError, "read the disk's I/O limits",
    /// No disk has that id.
    UnknownDisk(String) => "the machine has no disk {0:?}"
);
operation_error!(
    /// Why a screenshot could not be taken.
    ScreenshotError, "take a screenshot",
    /// The machine has no display.
    NoDisplay(String) => "machine {0} has no display",
    /// The PNG file could not be created.
    Create(std::io::Error) => "creating the PNG file: {0}"
);
operation_error!(
    /// Why a machine could not be shut down.
    ShutdownError, "shut the machine down",
    /// Killing it failed.
    Kill(crate::VmError) => "killing the machine: {0}"
);

/// What a machine is doing, as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineStatus {
    /// Whether its vCPUs run.
    pub running: bool,
    /// QEMU's run state: `running`, `paused`, `shutdown`, `inmigrate`, `internal-error`, ...
    pub state: String,
}

/// How a [`Machine::shutdown`] went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shutdown {
    /// Whether the guest ignored the power button until the timeout and was killed.
    pub forced: bool,
    /// From the button press to QEMU's exit.
    pub took: Duration,
    /// How QEMU exited.
    pub exit: VmExit,
}

/// A CD-ROM drive's current medium: its block node, `None` when empty.
#[derive(Debug)]
struct Drive {
    node: Option<String>,
}

/// A running machine. Dropping it without [`Machine::detach`] kills its QEMU.
pub struct Machine {
    vm: QemuVm,
    pub(super) qmp: Arc<Qmp>,
    name: String,
    has_display: bool,
    /// Disk id → (block node, read-only).
    pub(super) disks: HashMap<String, (String, bool)>,
    /// Disks with a throttle group (named after the disk's filter node).
    throttled: HashMap<String, String>,
    /// How many times the guest reset (rebooted) since this handle was made.
    resets: watch::Receiver<u64>,
    /// CD-ROM drive id → its medium.
    drives: tokio::sync::Mutex<HashMap<String, Drive>>,
    /// Names media inserted at run time.
    generation: AtomicU64,
    /// The next fd set for a file passed at run time (those of the command line come first).
    next_fdset: AtomicU64,
    pub(super) run_dir: PathBuf,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("name", &self.name)
            .field("pid", &self.vm.pid())
            .finish_non_exhaustive()
    }
}

impl Machine {
    pub(super) fn new(vm: QemuVm, qmp: Arc<Qmp>, spec: &MachineSpec, first_runtime_fdset: u64) -> Self {
        let (resets_tx, resets) = watch::channel(0u64);
        let mut events = qmp.events();
        // Ends when QEMU's QMP connection closes (the event channel's sender goes with it).
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(event) if event["event"] == "RESET" => resets_tx.send_modify(|n| *n += 1),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Self {
            throttled: spec
                .resources
                .disk_io
                .iter()
                .filter(|(_, l)| l.is_limited())
                .map(|(id, _)| (id.clone(), super::resources::throttle_node(id)))
                .collect(),
            resets,
            vm,
            qmp,
            name: spec.name.clone(),
            has_display: spec.display != super::Display::None,
            // A resize is addressed to the node the device is attached to (the throttle filter
            // of a limited disk, which passes it to the format node `disk-ID`): only its
            // parents (the device) are told the new size.
            disks: spec
                .disks
                .iter()
                .map(|d| {
                    let limited = spec.resources.disk_io.get(&d.id).is_some_and(|l| l.is_limited());
                    let node = if limited {
                        super::resources::throttle_node(&d.id)
                    } else {
                        format!("disk-{}", d.id)
                    };
                    (d.id.clone(), (node, d.read_only))
                })
                .collect(),
            drives: tokio::sync::Mutex::new(
                spec.cdroms
                    .iter()
                    .map(|c| {
                        let node = c.iso.as_ref().map(|_| medium_node(&c.id, 0));
                        (c.id.clone(), Drive { node })
                    })
                    .collect(),
            ),
            generation: AtomicU64::new(1),
            next_fdset: AtomicU64::new(first_runtime_fdset),
            run_dir: spec.run_dir.clone(),
        }
    }

    /// A machine taken over: what its CD-ROM drives hold now (drive id → block node) and the
    /// next generation of media names.
    pub(super) fn with_media(self, media: HashMap<String, Option<String>>, generation: u64) -> Self {
        *self.drives.try_lock().expect("a new machine's drives are free") =
            media.into_iter().map(|(id, node)| (id, Drive { node })).collect();
        self.generation.store(generation, Ordering::Relaxed);
        self
    }

    /// Counts the guest's resets (reboots: QMP `RESET`) since this handle was made; a machine
    /// reboots without QEMU exiting, so this is how a reboot is seen (to eject an installer's
    /// CD after its first boot, say).
    pub fn resets(&self) -> watch::Receiver<u64> {
        self.resets.clone()
    }

    /// Every QMP event QEMU sends from now on (`RESET`, `STOP`, `RESUME`, `SHUTDOWN`,
    /// `GUEST_PANICKED`, `DEVICE_TRAY_MOVED`, ...), as QEMU's JSON.
    pub fn events(&self) -> tokio::sync::broadcast::Receiver<serde_json::Value> {
        self.qmp.events()
    }

    /// The I/O limits in force on disk `disk`, as QEMU reports them (its throttle group's
    /// `limits`); none for a disk without limits.
    pub async fn io_limits(&self, disk: &str) -> Result<super::IoLimits, IoLimitsError> {
        if !self.disks.contains_key(disk) {
            return Err(IoLimitsError::UnknownDisk(disk.to_owned()));
        }
        let Some(group) = self.throttled.get(disk) else {
            return Ok(super::IoLimits::default());
        };
        let limits = self
            .qmp
            .execute(
                "qom-get",
                Some(json!({ "path": format!("/objects/{group}"), "property": "limits" })),
            )
            .await?;
        let set = |key: &str| limits[key].as_u64().filter(|v| *v > 0);
        Ok(super::IoLimits {
            iops: set("iops-total"),
            bps: set("bps-total"),
        })
    }

    /// The QEMU process.
    pub fn identity(&self) -> ProcessIdentity {
        self.vm.identity()
    }

    /// The uid QEMU runs as.
    pub fn uid(&self) -> u32 {
        self.vm.uid()
    }

    /// The serial console's socket.
    pub fn serial_socket(&self) -> PathBuf {
        self.run_dir.join("serial.sock")
    }

    /// The VNC display's socket (present only with a display).
    pub fn vnc_socket(&self) -> PathBuf {
        self.run_dir.join("vnc.sock")
    }

    /// Everything the serial console printed.
    pub fn console_log(&self) -> PathBuf {
        self.run_dir.join("console.log")
    }

    /// Watches for QEMU exiting; holds `None` while it runs.
    pub fn exit(&self) -> watch::Receiver<Option<VmExit>> {
        self.vm.exit()
    }

    /// Waits until QEMU has exited and says why.
    pub async fn wait_exit(&self) -> VmExit {
        let mut rx = self.vm.exit();
        let exit = match rx.wait_for(Option::is_some).await {
            Ok(exit) => exit.clone(),
            Err(_) => None,
        };
        exit.unwrap_or_else(|| VmExit {
            requested: false,
            reason: "the machine's supervisor is gone".into(),
            cause: crate::ExitCause::Other,
        })
    }

    /// Lets the machine run on without this handle (dropping the handle then leaves it running).
    pub fn detach(&self) {
        self.vm.detach();
    }

    /// Kills QEMU at once and waits until it is gone.
    pub async fn kill(&self) -> Result<(), crate::VmError> {
        self.vm.kill().await
    }

    /// Presses the ACPI power button (`system_powerdown`); the guest decides what to do.
    pub async fn power_off(&self) -> Result<(), PowerOffError> {
        self.qmp.execute("system_powerdown", None).await?;
        Ok(())
    }

    /// Presses the power button and waits up to `timeout` for the guest to power off; kills it
    /// if it has not by then. A machine that had already stopped is reported as it exited.
    pub async fn shutdown(&self, timeout: Duration) -> Result<Shutdown, ShutdownError> {
        let started = Instant::now();
        match self.qmp.execute("system_powerdown", None).await {
            Ok(_) => {}
            Err(err) if gone(&err) => {}
            Err(err) => return Err(ShutdownError::Refused(err)),
        }
        let (exit, forced) = match tokio::time::timeout(timeout, self.wait_exit()).await {
            Ok(exit) => (exit, false),
            Err(_) => {
                self.vm.kill().await.map_err(ShutdownError::Kill)?;
                (self.wait_exit().await, true)
            }
        };
        Ok(Shutdown {
            forced,
            took: started.elapsed(),
            exit,
        })
    }

    /// Stops the vCPUs (`stop`).
    pub async fn pause(&self) -> Result<(), PauseError> {
        self.qmp.execute("stop", None).await?;
        Ok(())
    }

    /// Lets paused vCPUs run again (`cont`).
    pub async fn resume(&self) -> Result<(), ResumeError> {
        self.qmp.execute("cont", None).await?;
        Ok(())
    }

    /// Tells QEMU to exit at once (`quit`), as pulling the plug; returns once it has.
    pub async fn quit(&self) -> Result<VmExit, QuitError> {
        match self.qmp.execute("quit", None).await {
            Ok(_) => {}
            Err(err) if gone(&err) => {}
            Err(err) => return Err(QuitError::Refused(err)),
        }
        Ok(self.wait_exit().await)
    }

    /// QEMU's run state (`query-status`).
    pub async fn status(&self) -> Result<MachineStatus, StatusError> {
        let status = self.qmp.execute("query-status", None).await?;
        Ok(MachineStatus {
            running: status["running"].as_bool().unwrap_or(false),
            state: status["status"].as_str().unwrap_or("unknown").to_owned(),
        })
    }

    /// Passes `file` to QEMU as a new fd set and returns its id. QEMU keeps the set while a
    /// block node or command that opened `/dev/fdset/ID` uses it, so the caller removes it
    /// ([`Machine::forget_fdset`]) right after that use began.
    pub(super) async fn pass(&self, file: &std::fs::File) -> Result<u64, QmpError> {
        let id = self.next_fdset.fetch_add(1, Ordering::Relaxed);
        self.qmp.pass_fdset(id, file.as_fd()).await?;
        Ok(id)
    }

    pub(super) async fn forget_fdset(&self, id: u64) {
        let _ = self.qmp.execute("remove-fd", Some(json!({ "fdset-id": id }))).await;
    }

    /// Puts `iso` into CD-ROM drive `drive` (replacing what is in it) while the machine runs;
    /// the tray is opened and closed as a person would (the guest sees a medium change).
    pub async fn change_medium(&self, drive: &str, iso: &Path) -> Result<(), MediumError> {
        let mut drives = self.drives.lock().await;
        let slot = drives
            .get_mut(drive)
            .ok_or_else(|| MediumError::UnknownDrive(drive.to_owned()))?;
        let file = std::fs::File::open(iso).map_err(MediumError::Open)?;
        let fdset = self.pass(&file).await?;
        let node = medium_node(drive, self.generation.fetch_add(1, Ordering::Relaxed));
        let added = self
            .qmp
            .execute(
                "blockdev-add",
                Some(json!({
                    "driver": "raw",
                    "node-name": node,
                    "read-only": true,
                    "file": { "driver": "file", "filename": format!("/dev/fdset/{fdset}") },
                })),
            )
            .await;
        self.forget_fdset(fdset).await;
        added?;
        let swapped = async {
            self.qmp
                .execute("blockdev-open-tray", Some(json!({ "id": drive, "force": true })))
                .await?;
            self.qmp
                .execute("blockdev-remove-medium", Some(json!({ "id": drive })))
                .await?;
            self.qmp
                .execute(
                    "blockdev-insert-medium",
                    Some(json!({ "id": drive, "node-name": node })),
                )
                .await?;
            self.qmp
                .execute("blockdev-close-tray", Some(json!({ "id": drive })))
                .await
        }
        .await;
        if let Err(err) = swapped {
            let _ = self
                .qmp
                .execute("blockdev-del", Some(json!({ "node-name": node })))
                .await;
            return Err(err.into());
        }
        if let Some(old) = slot.node.replace(node) {
            let _ = self
                .qmp
                .execute("blockdev-del", Some(json!({ "node-name": old })))
                .await;
        }
        Ok(())
    }

    /// Opens CD-ROM drive `drive`'s tray and takes its medium out (even if the guest locked
    /// the tray); the tray stays open. An empty drive is fine.
    pub async fn eject(&self, drive: &str) -> Result<(), EjectError> {
        let mut drives = self.drives.lock().await;
        let slot = drives
            .get_mut(drive)
            .ok_or_else(|| EjectError::UnknownDrive(drive.to_owned()))?;
        self.qmp
            .execute("blockdev-open-tray", Some(json!({ "id": drive, "force": true })))
            .await?;
        self.qmp
            .execute("blockdev-remove-medium", Some(json!({ "id": drive })))
            .await?;
        if let Some(old) = slot.node.take() {
            let _ = self
                .qmp
                .execute("blockdev-del", Some(json!({ "node-name": old })))
                .await;
        }
        Ok(())
    }

    /// Whether CD-ROM drive `drive` holds a medium, as QEMU reports it (`query-block`).
    pub async fn has_medium(&self, drive: &str) -> Result<bool, MediumError> {
        let blocks = self.qmp.execute("query-block", None).await?;
        let device = blocks
            .as_array()
            .and_then(|all| {
                all.iter()
                    .find(|b| b["qdev"].as_str().is_some_and(|q| names_device(q, drive)))
            })
            .ok_or_else(|| MediumError::UnknownDrive(drive.to_owned()))?;
        Ok(!device["inserted"].is_null())
    }

    /// Grows (or shrinks) disk `disk` to `bytes` while the machine runs (`block_resize`); the
    /// guest is told by its disk controller (virtio-blk and virtio-scsi report it at once).
    pub async fn resize_disk(&self, disk: &str, bytes: u64) -> Result<(), ResizeError> {
        let (node, read_only) = self
            .disks
            .get(disk)
            .ok_or_else(|| ResizeError::UnknownDisk(disk.to_owned()))?;
        if *read_only {
            return Err(ResizeError::ReadOnly(disk.to_owned()));
        }
        self.qmp
            .execute("block_resize", Some(json!({ "node-name": node, "size": bytes })))
            .await?;
        Ok(())
    }

    /// Writes the display's current picture to `png` (created or replaced) as a PNG file.
    pub async fn screenshot(&self, png: &Path) -> Result<(), ScreenshotError> {
        if !self.has_display {
            return Err(ScreenshotError::NoDisplay(self.name.clone()));
        }
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(png)
            .map_err(ScreenshotError::Create)?;
        let fdset = self.pass(&file).await?;
        let taken = self
            .qmp
            .execute(
                "screendump",
                Some(json!({ "filename": format!("/dev/fdset/{fdset}"), "format": "png" })),
            )
            .await;
        self.forget_fdset(fdset).await;
        taken?;
        Ok(())
    }
}
