//! Taking over from a previous server, and stopping so that the next one can.
//!
//! VMs are not children that die with the server (libvirt's promise): a server that crashes,
//! is killed or is upgraded leaves its VMs running, with their network slots, cgroups and files.
//! A starting server ([`Manager::recover`]) takes over every VM its store says runs and that is
//! still there (pid, start time and command line checked), reconnects its monitor and agent
//! channel, takes back its network slot (rules reloaded for this server's DNS forwarder), and
//! lets the store's deadlines and auto-pause go on as before. Only sandboxes whose VM is gone
//! are marked failed, with the reason read from their logs.
//!
//! Invariants:
//! - nothing of a VM that is still running is removed at start: its run directory, memory
//!   file, network slot, cgroup and uid stay; everything else of this server's is reclaimed
//!   (warm pool VMs and VMs of sandboxes that were starting are killed: they have no row or
//!   their client is gone);
//! - a VM whose vCPUs were stopped by an operation the previous server did not finish (pause,
//!   fork, snapshot) runs again once taken over; the unfinished node is removed like any
//!   `.building` directory;
//! - stopping leaves VMs running ([`ShutdownMode::Leave`], the default), pauses them into
//!   snapshot nodes, or kills them; only the last two (or leaving with nothing running) release
//!   this server's host resources.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use viv_api::SandboxState;
use viv_vmm::{AdoptedState, Adoption};

use super::{checked_policy, remove_files, LiveSandbox, Manager};
use crate::agent_client::AgentClient;
use crate::error::ApiError;
use crate::store::{SandboxRow, SnapshotKind};

/// What a stopping server does with the VMs of running sandboxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    /// Leave them running for the next server to take over (upgrades, restarts).
    Leave,
    /// Pause each into a snapshot node (a later `connect` resumes it); kill those that fail.
    Pause,
    /// Kill them (their sandboxes are gone).
    Kill,
}

impl std::str::FromStr for ShutdownMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "leave" => Ok(Self::Leave),
            "pause" => Ok(Self::Pause),
            "kill" => Ok(Self::Kill),
            other => Err(format!("unknown shutdown mode '{other}': use leave, pause or kill")),
        }
    }
}

impl std::fmt::Display for ShutdownMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Leave => "leave",
            Self::Pause => "pause",
            Self::Kill => "kill",
        })
    }
}

/// What [`Manager::recover`] found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Sandboxes whose running VM was taken over.
    pub adopted: Vec<String>,
    /// Sandboxes whose VM was gone (or could not be controlled), with the reason.
    pub failed: Vec<(String, String)>,
    /// VMs no sandbox owned (warm pool VMs, interrupted starts) that were killed.
    pub orphans: Vec<String>,
    /// What happened to the VM manager's VMs.
    pub vms: super::vm_recovery::VmRecovery,
}

/// How long a taken-over agent gets to answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// The last lines of a log, for a reason.
fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

impl Manager {
    /// Takes over from the previous server of this data directory: adopts the VMs of running
    /// sandboxes that are still there, marks those whose VM is gone, kills VMs no sandbox owns,
    /// sets up networking (keeping the slots of adopted VMs) and removes every file nothing
    /// needs any more.
    pub async fn recover(self: &Arc<Self>) -> Result<Recovery, ApiError> {
        let mut report = Recovery::default();
        let mut candidates: Vec<SandboxRow> = Vec::new();
        for row in self.store.local_sandboxes()? {
            match row.state {
                SandboxState::Running => {
                    let alive = row
                        .vmm
                        .is_some_and(|v| viv_vmm::process::start_time(v.pid) == Some(v.start_time));
                    if alive {
                        candidates.push(row);
                    } else {
                        let reason = self.vm_gone(&row, "its VM stopped while no server was running")?;
                        report.failed.push((row.id.clone(), reason));
                    }
                }
                SandboxState::Starting => {
                    // Its VM, if it got one, is killed with the orphans below.
                    let resuming = match row.snapshot_id.as_deref() {
                        Some(node) => self
                            .store
                            .snapshot(node)?
                            .is_some_and(|n| n.kind == SnapshotKind::Pause && n.sandbox_id == row.id),
                        None => false,
                    };
                    if resuming {
                        self.store.put_sandbox(&SandboxRow {
                            state: SandboxState::Paused,
                            vmm: None,
                            net_slot: None,
                            ..row.clone()
                        })?;
                    } else {
                        self.store
                            .fail_sandbox(&row.id, "the server stopped while the sandbox was starting")?;
                        report
                            .failed
                            .push((row.id.clone(), "the server stopped while it was starting".into()));
                    }
                }
                SandboxState::Paused | SandboxState::Failed => {}
            }
        }
        let mut keep: HashSet<String> = candidates.iter().map(|r| r.id.clone()).collect();
        let vms_running = self.vms_still_running()?;
        keep.extend(vms_running.iter().cloned());
        let run_root = self.config.data_dir.join("sandboxes");
        report.orphans = self.vmm.remove_orphans(&run_root, &|id| keep.contains(id));
        let slots: BTreeSet<u32> = candidates.iter().filter_map(|r| r.net_slot).collect();
        self.start_network(slots)
            .await
            .map_err(|e| ApiError::Unavailable(format!("setting up isolated networking: {e}")))?;
        self.start_switches().await?;
        for row in candidates {
            match self.adopt(&row).await {
                Ok(live) => {
                    self.live
                        .lock()
                        .expect("live lock")
                        .insert(row.id.clone(), live.clone());
                    self.watch(live);
                    report.adopted.push(row.id.clone());
                }
                Err(reason) => {
                    let reason = self.vm_gone(&row, &format!("taking over its VM failed: {reason}"))?;
                    report.failed.push((row.id.clone(), reason));
                }
            }
        }
        self.remove_unused_files(&report.adopted)?;
        report.vms = self.recover_vms(&vms_running).await?;
        self.sweep_vm_backups();
        for id in &report.adopted {
            self.metrics.sandboxes_taken_over.inc();
            tracing::info!(sandbox = %id, "sandbox taken over: its VM ran on while no server was running");
        }
        for _ in &report.orphans {
            self.metrics.orphan_vms_killed.inc();
        }
        for (id, reason) in &report.failed {
            tracing::warn!(sandbox = %id, %reason, "sandbox lost");
        }
        Ok(report)
    }

    /// Takes over the VM of running sandbox `row`.
    async fn adopt(self: &Arc<Self>, row: &SandboxRow) -> Result<Arc<LiveSandbox>, String> {
        let identity = row.vmm.ok_or("no VM process is recorded")?;
        let run_dir = self.run_dir(&row.id);
        let adoption = Adoption {
            vm_id: row.id.clone(),
            run_dir: run_dir.clone(),
            identity,
        };
        let (vm, state) = self.vmm.adopt(&adoption).await.map_err(|e| e.to_string())?;
        let slot = match (row.net_slot, self.net.get()) {
            (Some(index), Some(net)) => {
                let taken = match checked_policy(&row.network) {
                    Ok(policy) => net.adopt(index, policy).await.map_err(|e| e.to_string()),
                    Err(err) => Err(err.to_string()),
                };
                match taken {
                    Ok(slot) => Some(Arc::new(slot)),
                    Err(err) => {
                        let _ = vm.kill().await;
                        return Err(format!("taking back its network: {err}"));
                    }
                }
            }
            _ => None,
        };
        let root_disk = match vm.root_disk().await {
            Ok(disk) => disk,
            Err(err) => {
                let _ = vm.kill().await;
                return Err(format!("finding its disk: {err}"));
            }
        };
        let live = Arc::new(LiveSandbox {
            id: row.id.clone(),
            vm,
            agent: AgentClient::new(run_dir.join("agent.sock")),
            run_dir,
            memory_file: self.memory_file(&row.id),
            root_disk: Mutex::new(root_disk),
            op: tokio::sync::Mutex::new(()),
            slot: Mutex::new(slot),
        });
        live.agent.set_channel_key(self.channel_key.clone());
        live.agent.set_token(row.access_token.clone());
        live.agent.set_data_path(live.slot().map(|slot| slot.netns_path()));
        let ready = async {
            if state == AdoptedState::Stopped {
                // An operation of the previous server stopped the vCPUs and never finished.
                live.vm
                    .resume()
                    .await
                    .map_err(|e| format!("letting it run again: {e}"))?;
            }
            live.agent
                .wait_ready(AGENT_TIMEOUT)
                .await
                .map_err(|e| format!("its agent does not answer: {e}"))
        }
        .await;
        if let Err(err) = ready {
            let _ = live.vm.kill().await;
            live.release_network().await;
            return Err(err);
        }
        Ok(live)
    }

    /// Records that the VM of running sandbox `row` is gone, with `why` and what its logs say,
    /// and removes its files. A pause that had saved the sandbox before the server stopped
    /// leaves it paused instead. Returns the reason recorded.
    fn vm_gone(&self, row: &SandboxRow, why: &str) -> Result<String, ApiError> {
        let run_dir = self.run_dir(&row.id);
        let paused_in = self
            .store
            .snapshots()?
            .into_iter()
            .find(|n| n.kind == SnapshotKind::Pause && n.sandbox_id == row.id && n.parent_id == row.snapshot_id);
        let reason = if let Some(node) = paused_in {
            self.store.put_sandbox(&SandboxRow {
                state: SandboxState::Paused,
                snapshot_id: Some(node.id.clone()),
                vmm: None,
                net_slot: None,
                ..row.clone()
            })?;
            format!("paused in snapshot {} before the server stopped", node.id)
        } else {
            let mut reason = why.to_owned();
            let qemu = log_tail(&run_dir.join("qemu.log"), 3);
            if !qemu.is_empty() {
                reason.push_str(&format!("; QEMU said: {qemu}"));
            }
            let console = log_tail(&run_dir.join("console.log"), 5);
            if !console.is_empty() {
                reason.push_str(&format!("; console: {console}"));
            }
            self.store.fail_sandbox(&row.id, &reason)?;
            reason
        };
        remove_files(&run_dir, &self.memory_file(&row.id));
        Ok(reason)
    }

    /// Removes what belongs to no sandbox whose VM runs (`adopted`): run directories, memory
    /// files, interrupted builds and snapshots, unused layers.
    fn remove_unused_files(&self, adopted: &[String]) -> Result<(), ApiError> {
        self.recover_snapshots()?;
        self.collect_layers();
        let _ = std::fs::remove_dir_all(self.config.data_dir.join("builds"));
        // Template snapshots a crash interrupted.
        for dir in [self.config.data_dir.join("templates"), self.shm_dir.join("templates")] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.path().extension().is_some_and(|e| e == "building") {
                    let _ = std::fs::remove_dir_all(entry.path()).or_else(|_| std::fs::remove_file(entry.path()));
                }
            }
        }
        let keep: HashSet<std::ffi::OsString> = adopted
            .iter()
            .flat_map(|id| [id.into(), format!("{id}.mem").into()])
            .collect();
        for dir in [self.config.data_dir.join("sandboxes"), self.shm_dir.clone()] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_name() == "templates"
                    || entry.file_name() == super::shm_sweep::OWNER
                    || keep.contains(&entry.file_name())
                {
                    continue;
                }
                let _ = if entry.path().is_dir() {
                    std::fs::remove_dir_all(entry.path())
                } else {
                    std::fs::remove_file(entry.path())
                };
            }
        }
        Ok(())
    }

    /// Server shutdown: warm VMs are killed; the VMs of running sandboxes are left running,
    /// paused or killed as `mode` says. The periodic tasks end after it (see `stopping`).
    pub async fn shutdown(&self, mode: ShutdownMode) {
        self.shutdown_sandboxes(mode).await;
        self.stopping.cancel();
    }

    async fn shutdown_sandboxes(&self, mode: ShutdownMode) {
        // Their sandboxes are paused on their nodes already, whatever the mode.
        self.discard_parked().await;
        let vms_left_running = self.shutdown_vms(mode).await;
        self.stop_switches(vms_left_running).await;
        self.close_pool().await;
        // With nothing running there is nothing to leave: the host's network state goes too.
        let running = !self.live.lock().expect("live lock").is_empty();
        if mode == ShutdownMode::Leave && running {
            let lives: Vec<Arc<LiveSandbox>> = self.live.lock().expect("live lock").drain().map(|(_, l)| l).collect();
            for live in &lives {
                live.vm.detach();
                if let Some(slot) = live.slot.lock().expect("slot lock").take() {
                    match Arc::try_unwrap(slot) {
                        Ok(slot) => slot.detach(),
                        // Still in someone's hands: never dropped, so never removed.
                        Err(shared) => std::mem::forget(shared),
                    }
                }
            }
            if let Some(net) = self.net.get() {
                net.stop_leaving_slots();
            }
            tracing::info!(
                sandboxes = lives.len(),
                "leaving running sandboxes running; the next server on this data directory takes them over"
            );
            return;
        }
        let ids: Vec<String> = self.live.lock().expect("live lock").keys().cloned().collect();
        for id in ids {
            if mode == ShutdownMode::Pause && self.config.snapshots {
                // Not parked: the server is going.
                match self.pause_keeping(&id, true, false).await {
                    Ok(_) => continue,
                    Err(err) => tracing::warn!(sandbox = %id, error = %err, "pausing at shutdown failed; killing"),
                }
            }
            let _ = self.kill(&id).await;
        }
        let _ = std::fs::remove_dir(&self.shm_dir);
        if let Some(net) = self.net.get() {
            net.shutdown();
        }
        self.vmm.release_host();
    }
}
