//! Live migration of a running machine to another QEMU, over Unix sockets in the machines' run
//! directories (a jailed QEMU has no network): the caller relays the bytes between the two.
//!
//! Destination ([`Machine::receive`]): a machine launched with `-incoming defer` listens for the
//! RAM stream on `migrate.sock` and exports its (new, empty) writable disks over NBD on
//! `nbd.sock`, one export per block node, named after the node. [`Machine::finish_receiving`]
//! waits for the stream to complete and stops the NBD server; the vCPUs stay stopped until
//! [`Machine::resume`].
//!
//! Source: [`Machine::mirror_disks`] attaches an NBD client node per writable disk (connecting
//! to a socket the caller listens on) and runs `blockdev-mirror` in write-blocking mode, so once
//! every job is ready each guest write reaches both copies before it completes;
//! [`Machine::migrate_out`] then sends RAM and device state (the guest runs meanwhile; QEMU
//! stops it for the last pass) and [`Machine::end_mirrors`] completes the jobs and detaches the
//! NBD nodes. [`Machine::abort_migration`] undoes all of it and lets the guest run on here.
//!
//! Invariants:
//! - the source's guest keeps running until QEMU's final pass; after a failed or cancelled
//!   migration [`Machine::abort_migration`] leaves its disks active and its vCPUs running;
//! - the destination's disks are only written through the NBD exports until the stream has
//!   completed, and the exports are gone before its vCPUs may run;
//! - the block node names are those of the same definition on both sides (the exports are named
//!   after them).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::Machine;
use super::StateError;

/// The RAM stream's socket in the run directory.
pub const MIGRATE_SOCKET: &str = "migrate.sock";
/// The destination's NBD server socket in its run directory.
pub const NBD_SOCKET: &str = "nbd.sock";

/// Prefix of the NBD client nodes and mirror jobs on the source.
const MIRROR_PREFIX: &str = "migrate-";

/// Where an outgoing migration is, from `query-migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MigrationProgress {
    /// Bytes of RAM sent.
    pub transferred: u64,
    /// Bytes of guest RAM in all.
    pub total: u64,
}

/// A completed migration's figures, from `query-migrate`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationStats {
    /// From start to completion, in milliseconds.
    pub total_ms: u64,
    /// How long the guest was stopped, in milliseconds.
    pub downtime_ms: u64,
    /// Bytes of RAM sent.
    pub transferred: u64,
}

impl Machine {
    /// A socket path in this machine's run directory.
    pub fn run_socket(&self, name: &str) -> PathBuf {
        self.run_dir.join(name)
    }

    /// How many writable disks the machine started with (those a migration copies; disks
    /// hot-added or removed since are not counted).
    pub fn started_writable_disks(&self) -> usize {
        self.writable_nodes().len()
    }

    /// Destination: listens for the RAM stream on [`MIGRATE_SOCKET`] and exports the writable
    /// disks over NBD on [`NBD_SOCKET`]. The machine must have been launched `incoming`.
    pub async fn receive(&self) -> Result<(), StateError> {
        let nbd = self.run_socket(NBD_SOCKET);
        let _ = std::fs::remove_file(&nbd);
        self.qmp
            .execute(
                "nbd-server-start",
                Some(json!({ "addr": { "type": "unix", "data": { "path": nbd.to_string_lossy() } } })),
            )
            .await?;
        for node in self.writable_nodes() {
            self.qmp
                .execute(
                    "block-export-add",
                    Some(json!({
                        "type": "nbd", "id": format!("{MIRROR_PREFIX}{node}"), "node-name": node,
                        "name": node, "writable": true,
                    })),
                )
                .await?;
        }
        let ram = self.run_socket(MIGRATE_SOCKET);
        let _ = std::fs::remove_file(&ram);
        self.qmp
            .execute(
                "migrate-incoming",
                Some(json!({ "uri": format!("unix:{}", ram.display()) })),
            )
            .await?;
        // QEMU listens once the command returns.
        Ok(())
    }

    /// Destination: whether a RAM stream has arrived (it is being received, or was).
    pub async fn stream_arrived(&self) -> Result<bool, StateError> {
        let status = self.qmp.execute("query-migrate", None).await?;
        Ok(!matches!(
            status["status"].as_str().unwrap_or_default(),
            "" | "none" | "setup"
        ))
    }

    /// Destination: waits (up to `timeout`) for the RAM stream to complete, then removes the NBD
    /// exports and server. The vCPUs stay stopped.
    pub async fn finish_receiving(&self, timeout: Duration) -> Result<(), StateError> {
        let started = Instant::now();
        loop {
            let status = self.qmp.execute("query-migrate", None).await?;
            match status["status"].as_str().unwrap_or_default() {
                "completed" => break,
                "failed" | "cancelled" => {
                    return Err(StateError::Failed(
                        status["error-desc"]
                            .as_str()
                            .unwrap_or("the incoming migration failed")
                            .to_owned(),
                    ))
                }
                _ if started.elapsed() > timeout => {
                    return Err(StateError::Failed(format!(
                        "the incoming migration did not complete in {} s",
                        timeout.as_secs()
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        for node in self.writable_nodes() {
            let _ = self
                .qmp
                .execute(
                    "block-export-del",
                    Some(json!({ "id": format!("{MIRROR_PREFIX}{node}") })),
                )
                .await;
        }
        let _ = self.qmp.execute("nbd-server-stop", None).await;
        while started.elapsed() < timeout {
            let status = self.qmp.execute("query-status", None).await?;
            if status["status"] != "inmigrate" {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(StateError::Failed("the machine stayed in 'inmigrate'".into()))
    }

    /// Source: mirrors every writable disk to the export of the same name on the NBD server at
    /// `nbd` (a socket this machine's QEMU can connect to), and waits until every job is ready
    /// (reporting `progress(done, total)` in bytes) or `timeout` passes.
    pub async fn mirror_disks(
        &self,
        nbd: &std::path::Path,
        timeout: Duration,
        progress: &mut (dyn FnMut(u64, u64) + Send),
    ) -> Result<(), StateError> {
        let nodes = self.writable_nodes();
        for node in &nodes {
            let target = format!("{MIRROR_PREFIX}{node}");
            self.qmp
                .execute(
                    "blockdev-add",
                    Some(json!({
                        "driver": "nbd", "node-name": target, "export": node,
                        "server": { "type": "unix", "path": nbd.to_string_lossy() },
                    })),
                )
                .await?;
            self.qmp
                .execute(
                    "blockdev-mirror",
                    Some(json!({
                        "job-id": target, "device": node, "target": target, "sync": "full",
                        "copy-mode": "write-blocking", "auto-dismiss": false,
                    })),
                )
                .await?;
        }
        let started = Instant::now();
        loop {
            let jobs = self.qmp.execute("query-block-jobs", None).await?;
            let ours: Vec<&Value> = jobs
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|j| j["device"].as_str().is_some_and(|d| d.starts_with(MIRROR_PREFIX)))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(failed) = ours
                .iter()
                .find(|j| j["status"] == "concluded" || j["error"].is_string())
            {
                return Err(StateError::Failed(format!(
                    "copying disk node {}: {}",
                    failed["device"].as_str().unwrap_or("?"),
                    failed["error"].as_str().unwrap_or("the mirror job ended")
                )));
            }
            if ours.len() < nodes.len() {
                return Err(StateError::Failed("a disk's mirror job vanished".into()));
            }
            let (done, total) = ours.iter().fold((0, 0), |(d, t), j| {
                (
                    d + j["offset"].as_u64().unwrap_or(0),
                    t + j["len"].as_u64().unwrap_or(0),
                )
            });
            progress(done, total);
            if ours.iter().all(|j| j["ready"] == true) {
                return Ok(());
            }
            if started.elapsed() > timeout {
                return Err(StateError::Failed(format!(
                    "the disks were not copied within {} s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Source: sends RAM and device state to the socket at `to` (which this machine's QEMU can
    /// connect to), reporting progress, until the migration completes (the guest then stays
    /// stopped here) or fails or `timeout` passes (the migration is then cancelled).
    pub async fn migrate_out(
        &self,
        to: &std::path::Path,
        timeout: Duration,
        progress: &mut (dyn FnMut(MigrationProgress) + Send),
    ) -> Result<MigrationStats, StateError> {
        // A guest dirtying memory faster than it is sent gets its vCPUs throttled until the
        // migration converges, rather than migrating forever.
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(json!({ "capabilities": [{ "capability": "auto-converge", "state": true }] })),
            )
            .await?;
        self.qmp
            .execute("migrate", Some(json!({ "uri": format!("unix:{}", to.display()) })))
            .await?;
        let started = Instant::now();
        loop {
            let status = self.qmp.execute("query-migrate", None).await?;
            let ram = &status["ram"];
            progress(MigrationProgress {
                transferred: ram["transferred"].as_u64().unwrap_or(0),
                total: ram["total"].as_u64().unwrap_or(0),
            });
            match status["status"].as_str().unwrap_or_default() {
                "completed" => {
                    return Ok(MigrationStats {
                        total_ms: status["total-time"].as_u64().unwrap_or(0),
                        downtime_ms: status["downtime"].as_u64().unwrap_or(0),
                        transferred: ram["transferred"].as_u64().unwrap_or(0),
                    })
                }
                "failed" | "cancelled" => {
                    return Err(StateError::Failed(
                        status["error-desc"]
                            .as_str()
                            .unwrap_or("the migration failed")
                            .to_owned(),
                    ))
                }
                _ if started.elapsed() > timeout => {
                    let _ = self.qmp.execute("migrate_cancel", None).await;
                    return Err(StateError::Failed(format!(
                        "the migration did not complete in {} s",
                        timeout.as_secs()
                    )));
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Source, after a completed migration: completes the mirror jobs (the copies are in sync:
    /// the guest is stopped and every write was mirrored) and detaches the NBD nodes.
    pub async fn end_mirrors(&self) -> Result<(), StateError> {
        for node in self.writable_nodes() {
            let job = format!("{MIRROR_PREFIX}{node}");
            self.qmp
                .execute("block-job-cancel", Some(json!({ "device": job })))
                .await?;
        }
        self.reap_mirrors().await
    }

    /// Source, after anything failed: cancels a migration and the mirror jobs, detaches the NBD
    /// nodes, reactivates the disks and lets the guest run again.
    pub async fn abort_migration(&self) -> Result<(), StateError> {
        let _ = self.qmp.execute("migrate_cancel", None).await;
        for _ in 0..200 {
            let status = self.qmp.execute("query-migrate", None).await?;
            if !matches!(
                status["status"].as_str().unwrap_or_default(),
                "active" | "setup" | "cancelling" | "device" | "pre-switchover" | "wait-unplug"
            ) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        for node in self.writable_nodes() {
            let job = format!("{MIRROR_PREFIX}{node}");
            let _ = self
                .qmp
                .execute("block-job-cancel", Some(json!({ "device": job, "force": true })))
                .await;
        }
        let _ = self.reap_mirrors().await;
        let _ = self
            .qmp
            .execute("blockdev-set-active", Some(json!({ "active": true })))
            .await;
        let status = self.qmp.execute("query-status", None).await?;
        if status["running"] != true {
            self.qmp.execute("cont", None).await?;
        }
        Ok(())
    }

    /// Waits for the mirror jobs to end, dismisses them and deletes their NBD nodes.
    async fn reap_mirrors(&self) -> Result<(), StateError> {
        let started = Instant::now();
        loop {
            let jobs = self.qmp.execute("query-block-jobs", None).await?;
            let pending: Vec<String> = jobs
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|j| {
                    j["device"]
                        .as_str()
                        .filter(|d| d.starts_with(MIRROR_PREFIX))
                        .map(|d| (d, j))
                })
                .filter_map(|(d, j)| {
                    if j["status"] == "concluded" {
                        None
                    } else {
                        Some(d.to_owned())
                    }
                })
                .collect();
            if pending.is_empty() || started.elapsed() > Duration::from_secs(30) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut failed = None;
        for node in self.writable_nodes() {
            let name = format!("{MIRROR_PREFIX}{node}");
            let _ = self.qmp.execute("job-dismiss", Some(json!({ "id": name }))).await;
            if let Err(err) = self
                .qmp
                .execute("blockdev-del", Some(json!({ "node-name": name })))
                .await
            {
                failed.get_or_insert(err);
            }
        }
        match failed {
            // A node never attached (an early failure) is no error.
            Some(crate::qmp::QmpError::Command { desc, .. }) if desc.contains("not found") => Ok(()),
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }
}
