//! A running machine's whole state at one instant, for forks: its memory and device state
//! saved into a file through QEMU's migration (`file:/dev/fdset/N`, a descriptor the server
//! opened), its writable disks marked by an internal snapshot taken at the same instant, and a
//! new machine started with `-incoming defer` loading that state.
//!
//! Invariants:
//! - the state is saved only while the vCPUs are stopped, so memory, devices and the disks'
//!   internal snapshot describe the same instant;
//! - after a save the machine's disks are active again (a completed migration hands them to
//!   the destination; here there is none), so the machine may run on or stay paused;
//! - QEMU opens no file of ours: the state file travels as a descriptor in a one-use fd set.

use std::time::Duration;

use serde_json::json;

use super::Machine;
use crate::qmp::QmpError;

/// Why saving or loading a machine's state failed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The machine is not running any more.
    #[error("the machine has stopped")]
    Stopped,
    /// QEMU refused a command.
    #[error("QEMU refused: {0}")]
    Refused(QmpError),
    /// The migration failed.
    #[error("{0}")]
    Failed(String),
    /// The state file could not be written.
    #[error("writing the state file: {0}")]
    Io(#[from] std::io::Error),
}

impl From<QmpError> for StateError {
    fn from(err: QmpError) -> Self {
        if matches!(err, QmpError::Closed | QmpError::Io(_)) {
            Self::Stopped
        } else {
            Self::Refused(err)
        }
    }
}

impl Machine {
    /// The agent channel's socket, for a machine launched with
    /// [`super::MachineSpec::agent_channel`].
    pub fn agent_socket(&self) -> std::path::PathBuf {
        self.run_dir.join("agent.sock")
    }

    /// Stops the vCPUs (a no-op when they are stopped).
    pub async fn stop_vcpus(&self) -> Result<(), StateError> {
        self.qmp.execute("stop", None).await?;
        Ok(())
    }

    /// Takes internal snapshot `tag` of every writable disk at once (the vCPUs stopped by the
    /// caller); on failure none is left.
    pub async fn mark_disks(&self, tag: &str) -> Result<(), StateError> {
        for node in self.writable_nodes() {
            let done = self
                .qmp
                .execute(
                    "blockdev-snapshot-internal-sync",
                    Some(json!({"device": node, "name": tag})),
                )
                .await;
            if let Err(err) = done {
                self.unmark_disks(tag).await;
                return Err(err.into());
            }
        }
        Ok(())
    }

    /// Deletes internal snapshot `tag` from every writable disk that has it.
    pub async fn unmark_disks(&self, tag: &str) {
        for node in self.writable_nodes() {
            let _ = self
                .qmp
                .execute(
                    "blockdev-snapshot-delete-internal-sync",
                    Some(json!({"device": node, "name": tag})),
                )
                .await;
        }
    }

    /// Saves memory and device state into `file` (opened for writing; synced before this
    /// returns). The vCPUs must be stopped; they stay stopped, with the disks active again.
    pub async fn save_state(&self, file: std::fs::File) -> Result<(), StateError> {
        // A local file, not a network: no bandwidth limit; guest memory is all in the stream.
        self.qmp
            .execute("migrate-set-parameters", Some(json!({ "max-bandwidth": i64::MAX / 2 })))
            .await?;
        let fdset = self.pass(&file).await?;
        let saved = async {
            self.qmp
                .execute("migrate", Some(json!({ "uri": format!("file:/dev/fdset/{fdset}") })))
                .await?;
            crate::qemu::wait_migration(&self.qmp).await.map_err(StateError::Failed)
        }
        .await;
        self.forget_fdset(fdset).await;
        // A completed migration inactivates the disks for a destination to take them; this
        // machine keeps them.
        let activated = self
            .qmp
            .execute("blockdev-set-active", Some(json!({ "active": true })))
            .await;
        saved?;
        activated?;
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(std::io::Error::other)??;
        Ok(())
    }

    /// Loads memory and device state from `file` (opened read-only) into a machine started
    /// with [`super::MachineSpec::incoming`]; its vCPUs stay stopped until [`Machine::resume`].
    pub async fn load_state(&self, file: std::fs::File) -> Result<(), StateError> {
        let fdset = self.pass(&file).await?;
        let loaded = async {
            self.qmp
                .execute(
                    "migrate-incoming",
                    Some(json!({ "uri": format!("file:/dev/fdset/{fdset}") })),
                )
                .await?;
            crate::qemu::wait_migration(&self.qmp).await.map_err(StateError::Failed)
        }
        .await;
        self.forget_fdset(fdset).await;
        loaded?;
        // The incoming side reports completion before its run state leaves `inmigrate`.
        for _ in 0..500 {
            let status = self.qmp.execute("query-status", None).await?;
            if status["status"] != "inmigrate" {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(StateError::Failed("the loaded machine stayed in 'inmigrate'".into()))
    }
}
