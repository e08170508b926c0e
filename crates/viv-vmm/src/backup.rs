//! Full and incremental backups of qcow2 disks through QEMU's block layer: `blockdev-backup`
//! jobs into qcow2 targets, with a persistent dirty bitmap per disk marking what changed since
//! the last backup. The same QMP sequence runs in a VM's own QEMU (while it runs) and in a
//! `qemu-storage-daemon` the caller starts over a stopped VM's disks ([`StorageDaemon`]).
//!
//! Invariants:
//! - every disk of one backup is copied from the same instant: the bitmaps are added and the
//!   jobs started in one `transaction` (a job failing fails the backup as a whole; since no job
//!   clears a bitmap, the others' success changes nothing either);
//! - a backup never clears the bitmap it reads (`sync: bitmap`, `bitmap-mode: never`) and adds
//!   the bitmap the next one reads in the same transaction; the caller removes the older bitmap
//!   only once the new backup is recorded, so a backup lost to a crash never loses a change;
//! - a failed backup removes the bitmap it added and every target node; no job is left behind;
//! - bitmaps of ours are the ones named with [`BITMAP_PREFIX`]; others are never touched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use crate::qmp::{Qmp, QmpError};

/// The prefix of the dirty bitmaps backups add.
pub const BITMAP_PREFIX: &str = "viv-bk-";

/// One disk to back up: its qcow2 format node and the file QEMU writes the copy to (a path, or
/// `/dev/fdset/N` for a jailed QEMU), a qcow2 image the caller created with the disk's size
/// (and, for an incremental backup, with the previous backup as its backing file).
#[derive(Debug, Clone)]
pub struct BackupDisk {
    /// The disk's format node (`disk-ID`).
    pub node: String,
    /// The target file as QEMU opens it.
    pub target: String,
}

/// What a backup copies.
#[derive(Debug, Clone, Copy)]
pub enum BackupSync<'a> {
    /// Every block.
    Full,
    /// The blocks bitmap `name` marked (those written since the backup that added it).
    Since(&'a str),
}

/// Why a backup failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// QEMU went away.
    #[error("QEMU stopped during the backup")]
    Stopped,
    /// QEMU refused a command.
    #[error("QEMU refused: {0}")]
    Refused(QmpError),
    /// A disk lacks the bitmap an incremental backup reads, or it is unusable.
    #[error("disk node '{node}' has no usable change bitmap '{bitmap}' ({reason}); take a full backup")]
    NoBitmap {
        /// The node.
        node: String,
        /// The bitmap.
        bitmap: String,
        /// Missing or inconsistent.
        reason: &'static str,
    },
    /// A job failed.
    #[error("the backup job failed: {0}")]
    Failed(String),
    /// `qemu-storage-daemon` could not be used.
    #[error("qemu-storage-daemon: {0}")]
    Daemon(String),
}

impl From<QmpError> for BackupError {
    fn from(err: QmpError) -> Self {
        if matches!(err, QmpError::Closed | QmpError::Io(_)) {
            Self::Stopped
        } else {
            Self::Refused(err)
        }
    }
}

/// A dirty bitmap as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    /// Its name.
    pub name: String,
    /// Unusable (QEMU did not close the image cleanly while it was recorded).
    pub inconsistent: bool,
}

/// The dirty bitmaps of each named block node.
pub async fn bitmaps(qmp: &Qmp) -> Result<HashMap<String, Vec<Bitmap>>, BackupError> {
    let nodes = qmp
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .await?;
    let mut out: HashMap<String, Vec<Bitmap>> = HashMap::new();
    for node in nodes.as_array().map(Vec::as_slice).unwrap_or_default() {
        let Some(name) = node["node-name"].as_str() else {
            continue;
        };
        let list = out.entry(name.to_owned()).or_default();
        for bitmap in node["dirty-bitmaps"].as_array().map(Vec::as_slice).unwrap_or_default() {
            if let Some(bitmap_name) = bitmap["name"].as_str() {
                list.push(Bitmap {
                    name: bitmap_name.to_owned(),
                    inconsistent: bitmap["inconsistent"].as_bool().unwrap_or(false),
                });
            }
        }
    }
    Ok(out)
}

/// Checks that every node has bitmap `name`, consistent.
pub async fn check_bitmap(qmp: &Qmp, nodes: &[String], name: &str) -> Result<(), BackupError> {
    let all = bitmaps(qmp).await?;
    for node in nodes {
        let found = all.get(node).and_then(|list| list.iter().find(|b| b.name == name));
        match found {
            None => {
                return Err(BackupError::NoBitmap {
                    node: node.clone(),
                    bitmap: name.to_owned(),
                    reason: "missing",
                })
            }
            Some(b) if b.inconsistent => {
                return Err(BackupError::NoBitmap {
                    node: node.clone(),
                    bitmap: name.to_owned(),
                    reason: "inconsistent after an unclean stop",
                })
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Removes every bitmap of ours (named [`BITMAP_PREFIX`]...) on `nodes` but `keep`.
pub async fn remove_bitmaps_except(qmp: &Qmp, nodes: &[String], keep: Option<&str>) -> Result<(), BackupError> {
    let all = bitmaps(qmp).await?;
    for node in nodes {
        for bitmap in all.get(node).map(Vec::as_slice).unwrap_or_default() {
            if bitmap.name.starts_with(BITMAP_PREFIX) && Some(bitmap.name.as_str()) != keep {
                qmp.execute(
                    "block-dirty-bitmap-remove",
                    Some(json!({"node": node, "name": bitmap.name})),
                )
                .await?;
            }
        }
    }
    Ok(())
}

/// Copies `disks` into their targets (see the module's invariants), adding bitmap `new_bitmap`
/// (persistent) to each disk at the backup's instant. Progress is a fraction from 0 to 1.
pub async fn run_backup(
    qmp: &Qmp,
    disks: &[BackupDisk],
    sync: BackupSync<'_>,
    new_bitmap: &str,
    progress: &mut (dyn FnMut(f64) + Send),
) -> Result<(), BackupError> {
    let nodes: Vec<String> = disks.iter().map(|d| d.node.clone()).collect();
    if let BackupSync::Since(bitmap) = sync {
        check_bitmap(qmp, &nodes, bitmap).await?;
    }
    let targets: Vec<String> = (0..disks.len()).map(|i| format!("viv-bk-target{i}")).collect();
    let jobs: Vec<String> = (0..disks.len()).map(|i| format!("viv-bk-job{i}")).collect();
    let mut added = Vec::new();
    let outcome = async {
        for (disk, target) in disks.iter().zip(&targets) {
            qmp.execute(
                "blockdev-add",
                Some(json!({
                    "driver": "qcow2",
                    "node-name": target,
                    "backing": null,
                    "file": {"driver": "file", "filename": disk.target},
                })),
            )
            .await?;
            added.push(target.clone());
        }
        let mut actions = Vec::new();
        for ((disk, target), job) in disks.iter().zip(&targets).zip(&jobs) {
            actions.push(json!({
                "type": "block-dirty-bitmap-add",
                "data": {"node": disk.node, "name": new_bitmap, "persistent": true},
            }));
            let mut backup = json!({
                "job-id": job,
                "device": disk.node,
                "target": target,
                "auto-dismiss": false,
                "sync": "full",
            });
            if let BackupSync::Since(bitmap) = sync {
                backup["sync"] = json!("bitmap");
                backup["bitmap"] = json!(bitmap);
                backup["bitmap-mode"] = json!("never");
            }
            actions.push(json!({"type": "blockdev-backup", "data": backup}));
        }
        qmp.execute("transaction", Some(json!({"actions": actions}))).await?;
        wait_jobs(qmp, &jobs, progress).await
    }
    .await;
    for target in added {
        let _ = qmp.execute("blockdev-del", Some(json!({"node-name": target}))).await;
    }
    if outcome.is_err() {
        for node in &nodes {
            let _ = qmp
                .execute(
                    "block-dirty-bitmap-remove",
                    Some(json!({"node": node, "name": new_bitmap})),
                )
                .await;
        }
    }
    outcome
}

/// Waits for every job in `ids` to conclude, dismissing each; the first error is returned.
async fn wait_jobs(qmp: &Qmp, ids: &[String], progress: &mut (dyn FnMut(f64) + Send)) -> Result<(), BackupError> {
    let mut error = None;
    let mut pending: Vec<String> = ids.to_vec();
    while !pending.is_empty() {
        let jobs = qmp.execute("query-jobs", None).await?;
        let jobs = jobs.as_array().cloned().unwrap_or_default();
        let (mut done, mut total) = (0u64, 0u64);
        for id in ids {
            if let Some(job) = jobs.iter().find(|j| j["id"] == id.as_str()) {
                done += job["current-progress"].as_u64().unwrap_or(0);
                total += job["total-progress"].as_u64().unwrap_or(0);
            }
        }
        if total > 0 {
            progress(done as f64 / total as f64);
        }
        let mut still = Vec::new();
        for id in pending {
            let job = jobs
                .iter()
                .find(|j| j["id"] == id.as_str())
                .cloned()
                .unwrap_or(Value::Null);
            match job["status"].as_str() {
                Some("concluded") => {
                    let _ = qmp.execute("job-dismiss", Some(json!({"id": id}))).await;
                    if let Some(e) = job["error"].as_str() {
                        error.get_or_insert_with(|| e.to_owned());
                    }
                }
                Some(_) => still.push(id),
                None => {
                    error.get_or_insert_with(|| format!("QEMU lost backup job {id}"));
                }
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    match error {
        Some(e) => Err(BackupError::Failed(e)),
        None => Ok(()),
    }
}

/// A `qemu-storage-daemon` serving a stopped VM's qcow2 disks over QMP, so its backups run the
/// same jobs as a running VM's. It opens the disks itself (they are pool disks the caller
/// checked; their backing files are pool disks too) and writes their bitmaps back when it quits.
/// Dropped without [`StorageDaemon::quit`], it is killed; it is killed too when the server dies
/// (parent-death signal), and its bitmaps are then inconsistent, so the next backup is full.
#[derive(Debug)]
pub struct StorageDaemon {
    child: tokio::process::Child,
    /// Its QMP connection.
    pub qmp: Qmp,
    socket: PathBuf,
}

impl StorageDaemon {
    /// Starts the daemon with each `(node, path)` opened as a qcow2 format node, its QMP socket
    /// at `socket` (removed first if left over).
    pub async fn start(socket: &Path, disks: &[(String, PathBuf)]) -> Result<StorageDaemon, BackupError> {
        let _ = std::fs::remove_file(socket);
        let mut command = tokio::process::Command::new("qemu-storage-daemon");
        command
            .arg("--chardev")
            .arg(format!("socket,id=qmp,path={},server=on,wait=off", socket.display()))
            .args(["--monitor", "chardev=qmp"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (node, path) in disks {
            let spec = json!({
                "driver": "qcow2",
                "node-name": node,
                "file": {"driver": "file", "filename": path},
            });
            command.arg("--blockdev").arg(spec.to_string());
        }
        // SAFETY: between fork and exec the closure only calls prctl, which is async-signal-safe
        // and touches nothing of the parent: the daemon is killed when the server dies (a crash
        // mid-backup must not leave it holding the VM's disks).
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            BackupError::Daemon(if e.kind() == std::io::ErrorKind::NotFound {
                "not installed; install the Debian package qemu-utils".into()
            } else {
                e.to_string()
            })
        })?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().map_err(|e| BackupError::Daemon(e.to_string()))? {
                let mut stderr = String::new();
                if let Some(mut err) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = (&mut err).take(8192).read_to_string(&mut stderr).await;
                }
                return Err(BackupError::Daemon(format!("exited ({status}): {}", stderr.trim())));
            }
            if let Ok(qmp) = Qmp::connect(socket).await {
                return Ok(StorageDaemon {
                    child,
                    qmp,
                    socket: socket.to_path_buf(),
                });
            }
            if tokio::time::Instant::now() > deadline {
                return Err(BackupError::Daemon("its QMP socket did not open within 20 s".into()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks the daemon to quit (it writes persistent bitmaps into the images as it closes
    /// them) and waits for it to exit.
    pub async fn quit(mut self) -> Result<(), BackupError> {
        let _ = self.qmp.execute("quit", None).await;
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .map_err(|_| BackupError::Daemon("did not quit within 60 s".into()))?
            .map_err(|e| BackupError::Daemon(e.to_string()))?;
        let _ = std::fs::remove_file(&self.socket);
        if status.success() {
            Ok(())
        } else {
            Err(BackupError::Daemon(format!("exited with {status}")))
        }
    }
}
