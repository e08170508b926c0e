//! Internal snapshots of a running machine's disks, with or without its memory and device
//! state, through QEMU's snapshot jobs (`snapshot-save`, `snapshot-load`, `snapshot-delete`) and
//! `blockdev-snapshot-internal-sync`.
//!
//! Invariants:
//! - only writable disks take part (read-only ones never change); every one of them must be
//!   qcow2, the format that holds internal snapshots;
//! - the memory and device state goes into the first writable disk, so a snapshot lives wholly
//!   inside the VM's own disk files and is deleted with them;
//! - a disk-only snapshot of a running machine is taken with its vCPUs stopped, so that the
//!   disks are consistent with each other (crash-consistent as a whole);
//! - a job that fails is dismissed and its error reported; none is left behind in QEMU.

use std::time::Duration;

use serde_json::{json, Value};

use super::Machine;
use crate::qmp::QmpError;

/// Why a snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The machine is not running any more.
    #[error("the machine has stopped")]
    Stopped,
    /// QEMU refused a command.
    #[error("QEMU refused: {0}")]
    Refused(QmpError),
    /// The machine has no writable disk to hold a snapshot.
    #[error("the machine has no writable disk to hold a snapshot")]
    NoDisk,
    /// The snapshot job failed.
    #[error("{0}")]
    Failed(String),
}

impl From<QmpError> for SnapshotError {
    fn from(err: QmpError) -> Self {
        if matches!(err, QmpError::Closed | QmpError::Io(_)) {
            Self::Stopped
        } else {
            Self::Refused(err)
        }
    }
}

impl Machine {
    /// The block nodes of the writable disks, in disk id order.
    pub(super) fn writable_nodes(&self) -> Vec<String> {
        let mut disks: Vec<(&String, &(String, bool))> = self.disks.iter().filter(|(_, (_, ro))| !ro).collect();
        disks.sort_by_key(|(id, _)| natural_key(id));
        disks.into_iter().map(|(_, (node, _))| node.clone()).collect()
    }

    /// Takes snapshot `tag` of every writable disk and, with `memory`, of the memory and device
    /// state. A running machine runs on afterwards.
    pub async fn save_snapshot(&self, tag: &str, memory: bool) -> Result<(), SnapshotError> {
        let nodes = self.writable_nodes();
        let first = nodes.first().ok_or(SnapshotError::NoDisk)?.clone();
        if memory {
            let job = format!("save-{tag}");
            self.qmp
                .execute(
                    "snapshot-save",
                    Some(json!({"job-id": job, "tag": tag, "vmstate": first, "devices": nodes})),
                )
                .await?;
            return self.finish_job(&job).await;
        }
        let was_running = self.status().await.map(|s| s.running).unwrap_or(false);
        if was_running {
            self.qmp.execute("stop", None).await?;
        }
        let mut outcome = Ok(());
        for node in &nodes {
            let done = self
                .qmp
                .execute(
                    "blockdev-snapshot-internal-sync",
                    Some(json!({"device": node, "name": tag})),
                )
                .await;
            if let Err(err) = done {
                outcome = Err(SnapshotError::from(err));
                break;
            }
        }
        if outcome.is_err() {
            // Leave no partial snapshot on the disks that took it.
            for node in &nodes {
                let _ = self
                    .qmp
                    .execute(
                        "blockdev-snapshot-delete-internal-sync",
                        Some(json!({"device": node, "name": tag})),
                    )
                    .await;
            }
        }
        if was_running {
            self.qmp.execute("cont", None).await?;
        }
        outcome
    }

    /// Loads snapshot `tag` (taken with memory) into the running machine: disks, memory and
    /// devices go back to that moment. The machine runs afterwards if it ran before.
    pub async fn load_snapshot(&self, tag: &str) -> Result<(), SnapshotError> {
        let nodes = self.writable_nodes();
        let first = nodes.first().ok_or(SnapshotError::NoDisk)?.clone();
        let job = format!("load-{tag}");
        self.qmp
            .execute(
                "snapshot-load",
                Some(json!({"job-id": job, "tag": tag, "vmstate": first, "devices": nodes})),
            )
            .await?;
        self.finish_job(&job).await
    }

    /// Deletes snapshot `tag` from every writable disk of the running machine.
    pub async fn delete_snapshot(&self, tag: &str) -> Result<(), SnapshotError> {
        let nodes = self.writable_nodes();
        if nodes.is_empty() {
            return Err(SnapshotError::NoDisk);
        }
        let job = format!("delete-{tag}");
        self.qmp
            .execute(
                "snapshot-delete",
                Some(json!({"job-id": job, "tag": tag, "devices": nodes})),
            )
            .await?;
        self.finish_job(&job).await
    }

    /// Waits for job `id` to conclude, dismisses it and reports its error.
    async fn finish_job(&self, id: &str) -> Result<(), SnapshotError> {
        loop {
            let jobs = self.qmp.execute("query-jobs", None).await?;
            let job = jobs
                .as_array()
                .and_then(|all| all.iter().find(|j| j["id"] == id))
                .cloned()
                .unwrap_or(Value::Null);
            match job["status"].as_str() {
                Some("concluded") => {
                    let _ = self.qmp.execute("job-dismiss", Some(json!({"id": id}))).await;
                    return match job["error"].as_str() {
                        Some(error) => Err(SnapshotError::Failed(error.to_owned())),
                        None => Ok(()),
                    };
                }
                Some(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                None => return Err(SnapshotError::Failed(format!("QEMU lost snapshot job {id}"))),
            }
        }
    }
}

/// `disk10` after `disk9`.
fn natural_key(id: &str) -> (String, u64) {
    let digits = id.trim_start_matches(|c: char| !c.is_ascii_digit());
    let prefix = id[..id.len() - digits.len()].to_owned();
    (prefix, digits.parse().unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_sort_by_number() {
        let mut ids = vec!["disk10", "disk2", "disk0"];
        ids.sort_by_key(|id| natural_key(id));
        assert_eq!(ids, ["disk0", "disk2", "disk10"]);
    }
}
