//! Snapshot nodes: pause, resume, fork and user snapshots as a tree.
//!
//! A node is a directory `snapshots/<id>/` holding `disk.qcow2` (the sandbox's disk overlay,
//! frozen: its backing file is the parent node's layer or the template's) and `state` (device
//! state and guest memory, as QEMU's migration stream; for a sandbox whose memory has a base,
//! only the pages that differ from its parent's, see `memory_chain.rs`) or, saved without memory, a `disk-only`
//! marker instead (a start from it boots the disk; see `lifecycle.rs`). A sandbox restored from a node writes to a
//! new overlay on the node's layer, so a node costs the blocks changed since its parent plus its
//! memory, never a copy of the disk.
//!
//! Invariants:
//! - a node directory is built under `<id>.building` and renamed into place before its row is
//!   written; directories without a row are removed at start;
//! - a node is deleted only when no node names it as parent and no running or paused sandbox
//!   descends from it; `pause` and `fork` nodes are collected as soon as that holds, `snapshot`
//!   nodes only when a user deletes them; a pause node that only its sandbox's next pause needs
//!   is folded into that pause's node (`pause_fold.rs`), so pausing again and again keeps one
//!   node and a short disk chain;
//! - a failed pause leaves the sandbox running (or failed, if its VM died) and its previous node
//!   untouched; a fork or snapshot that fails after the VM moved to its new overlay keeps the
//!   frozen layer as a node without state (that overlay's backing file), never a dangling chain.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use viv_api::{CreatedSandbox, ErrorBody, ForkResult, SandboxState, SnapshotInfo};
use viv_vmm::SnapshotMemory;

use super::{lifetime, now_ms, random_id, remove_files, LiveSandbox, Manager, OnFailure, Source, StartRequest};
use crate::error::ApiError;
use crate::store::{now_rfc3339_ms, SandboxRow, SnapshotKind, SnapshotRow};

/// What a save keeps of a running sandbox.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Keep {
    /// Its disk.
    Disk,
    /// Its disk and memory.
    Memory,
    /// Its disk and memory and, for a pause, its VM: stopped, parked for a quick resume
    /// (`parked.rs`).
    MemoryAndVm,
}

/// Most forks one request may ask for.
const MAX_FORKS: u32 = 64;

/// The tag of every snapshot (E2B names snapshots `NAME:TAG`; a snapshot here has one tag).
pub const SNAPSHOT_TAG: &str = "default";

impl Manager {
    pub(super) fn node_dir(&self, id: &str) -> PathBuf {
        self.config.data_dir.join("snapshots").join(id)
    }

    fn require_snapshots(&self) -> Result<(), ApiError> {
        if self.config.snapshots {
            Ok(())
        } else {
            Err(ApiError::BadRequest(
                "this server runs without snapshots (started with --snapshots=false); pause, fork and snapshot need them"
                    .into(),
            ))
        }
    }

    fn running(&self, id: &str) -> Result<(Arc<LiveSandbox>, SandboxRow), ApiError> {
        let live = self.live(id)?;
        let row = self.store.sandbox(id)?.ok_or_else(|| ApiError::sandbox_not_found(id))?;
        Ok((live, row))
    }

    /// Pauses a running sandbox: saves it (memory included) into a new node and stops its VM.
    pub async fn pause(&self, id: &str) -> Result<SnapshotInfo, ApiError> {
        self.pause_keeping(id, true, true).await
    }

    /// Pauses a running sandbox, keeping its memory or (`memory` false) only its disk; with
    /// `keep_warm` (and memory) its stopped VM may be parked for a quick resume (`parked.rs`).
    pub async fn pause_keeping(&self, id: &str, memory: bool, keep_warm: bool) -> Result<SnapshotInfo, ApiError> {
        self.require_snapshots()?;
        if let Some(row) = self.store.sandbox(id)? {
            if row.state == SandboxState::Paused {
                return Err(ApiError::Conflict(format!("sandbox '{id}' is already paused")));
            }
        }
        let (live, _) = self.running(id)?;
        let _op = live.op.lock().await;
        if !self.live.lock().expect("live lock").contains_key(id) {
            return Err(ApiError::sandbox_not_found(id));
        }
        // Read under the lock: an operation that held it may have moved the sandbox to a node.
        let (_, mut row) = self.running(id)?;
        let started = std::time::Instant::now();
        // Found before the new node names the nearest as its parent (see `pause_fold.rs`).
        let superseded = self.superseded_pauses(&row);
        let keep = match memory {
            false => Keep::Disk,
            true if keep_warm && self.may_park(&superseded) => Keep::MemoryAndVm,
            true => Keep::Memory,
        };
        let node = self
            .save_node(&live, &row, SnapshotKind::Pause, None, keep, superseded.last())
            .await?;
        self.live.lock().expect("live lock").remove(id);
        // Parked before the row says paused, so a resume that reads the row finds the VM.
        let parked = keep == Keep::MemoryAndVm;
        let superseded = if parked {
            self.park(live.clone(), &node, superseded);
            Vec::new()
        } else {
            superseded
        };
        row.state = SandboxState::Paused;
        row.snapshot_id = Some(node.id.clone());
        row.vmm = None;
        row.net_slot = None;
        self.store.put_sandbox(&row)?;
        self.publish_sandbox(id, "paused", Some(format!("snapshot {}", node.id)));
        if !parked {
            remove_files(&live.run_dir, &live.memory_file);
            drop(live.release_network_soon());
        }
        tracing::info!(sandbox = %id, snapshot = %node.id, bytes = node.bytes, parked, ms = started.elapsed().as_millis() as u64, "sandbox paused");
        drop(_op);
        let folding = self.fold_superseded(id, superseded, &node);
        // Copies on other nodes (--pause-replicas), before the pause answers; in a cluster they
        // are copies of the folded node, so the fold ends first.
        if let (Some(folding), Some(_)) = (folding, self.cluster_link.get()) {
            let _ = folding.await;
        }
        self.replicate_paused(id, &node.id).await;
        self.snapshot_info(node)
    }

    /// Resumes a paused sandbox from its node (a running one is left as it is): its memory
    /// restored, or (`memory` false, or a node saved without it) its disk booted afresh. Returns
    /// the sandbox and whether it was resumed. Resumes of one sandbox happen one at a time.
    pub async fn resume(
        self: &Arc<Self>,
        id: &str,
        timeout: Option<u64>,
        memory: bool,
    ) -> Result<(CreatedSandbox, bool), ApiError> {
        let timeout = lifetime(timeout)?;
        let gate = self.resume_gates.gate(id);
        let _resuming = gate.lock().await;
        let row = self.store.sandbox(id)?.ok_or_else(|| ApiError::sandbox_not_found(id))?;
        match row.state {
            SandboxState::Running => {
                // Connecting may extend a running sandbox's life, never shorten it (as E2B).
                self.store
                    .set_end(id, row.end_at_ms.max(now_ms() + timeout as i64 * 1000))?;
                return Ok((self.created(&row), false));
            }
            SandboxState::Paused => {}
            SandboxState::Starting => {
                return Err(ApiError::Conflict(format!(
                    "sandbox '{id}' is starting; try again shortly"
                )))
            }
            SandboxState::Failed => {
                return Err(ApiError::Sandbox(format!(
                    "sandbox '{id}' has failed: {}",
                    row.error.clone().unwrap_or_default()
                )))
            }
        }
        Ok((self.resume_locked(row, timeout, memory).await?, true))
    }

    /// Resumes paused sandbox `row` under its resume gate.
    pub(super) async fn resume_locked(
        self: &Arc<Self>,
        row: SandboxRow,
        timeout: u64,
        memory: bool,
    ) -> Result<CreatedSandbox, ApiError> {
        let id = row.id.clone();
        // Its files come here first when another node paused it.
        self.adopt_paused(&row).await?;
        let node_id = row.snapshot_id.clone().unwrap_or_default();
        let node = self.store.snapshot(&node_id)?.ok_or_else(|| {
            ApiError::NotFound(format!(
                "the snapshot holding paused sandbox '{id}' ({node_id}) no longer exists"
            ))
        })?;
        let disk_boot = self.boots_from_disk(&node, !memory);
        let source = Source::Node(Box::new(node));
        // Its VM still parked (paused moments ago): that VM runs on.
        let parked = match disk_boot {
            false => self.unpark(&id, &node_id).await,
            true => {
                self.discard_parked_of(&id).await;
                None
            }
        };
        if let Some(live) = parked {
            let start = StartRequest {
                pooled: Some(live),
                ..StartRequest::new(&source, timeout)
            };
            match self
                .start_sandbox(row.clone(), start, OnFailure::Restore(Box::new(row.clone())))
                .await
            {
                Ok(created) => return Ok(created),
                Err(err) => {
                    tracing::warn!(sandbox = %id, error = %err, "the parked VM did not resume; restoring its node")
                }
            }
        }
        let start = StartRequest {
            cold_boot: disk_boot,
            // A booted agent gets the environment the sandbox was created with again.
            env_vars: disk_boot.then(|| self.boot_env(&id)),
            ..StartRequest::new(&source, timeout)
        };
        let created = self
            .start_sandbox(row.clone(), start, OnFailure::Restore(Box::new(row)))
            .await?;
        // Running again: copies of the node it paused into are of no more use.
        if let Err(err) = self.drop_replicas(&node_id) {
            tracing::warn!(snapshot = %node_id, %err, "forgetting the copies of a resumed sandbox's snapshot");
        }
        self.remount_volumes(&id).await;
        Ok(created)
    }

    /// Snapshots a running sandbox once (it keeps running) and starts `count` sandboxes from
    /// that node. Each fork succeeds or fails on its own.
    pub async fn fork(
        self: &Arc<Self>,
        id: &str,
        count: u32,
        timeout: Option<u64>,
    ) -> Result<Vec<ForkResult>, ApiError> {
        self.require_snapshots()?;
        if !(1..=MAX_FORKS).contains(&count) {
            return Err(ApiError::BadRequest(format!(
                "count must be between 1 and {MAX_FORKS}, got {count}"
            )));
        }
        let timeout = lifetime(timeout)?;
        // No pause of the sandbox folds the fork node away before its children use it.
        let _no_fold = self.hold_folds_of(id).await;
        let (node, source) = self.snapshot_running(id, SnapshotKind::Fork, None, true).await?;
        // The node's state reaches the disk while the forks start from the page cache; the
        // answer waits for both.
        let state = self.node_dir(&node.id).join("state");
        let starts = async {
            let mut results = Vec::new();
            for _ in 0..count {
                let result = match self.start_fork(&node, &source, timeout).await {
                    Ok(sandbox) => ForkResult {
                        sandbox: Some(sandbox),
                        error: None,
                    },
                    Err(err) => ForkResult {
                        sandbox: None,
                        error: Some(ErrorBody {
                            code: err.status().as_u16(),
                            message: err.to_string(),
                        }),
                    },
                };
                results.push(result);
            }
            results
        };
        let (synced, results) = tokio::join!(viv_vmm::sync_file(&state), starts);
        if let Err(err) = synced {
            // Nothing half-done: the forks go, the node stays for the collector.
            for started in results.iter().filter_map(|r| r.sandbox.as_ref()) {
                let _ = self.kill(&started.sandbox_id).await;
            }
            return Err(ApiError::Internal(format!(
                "writing the state of sandbox {id}'s fork node {}: {err}",
                node.id
            )));
        }
        self.collect_snapshots();
        Ok(results)
    }

    /// Starts one fork of `source` from `node`: same template, metadata, security and auto-pause.
    async fn start_fork(
        self: &Arc<Self>,
        node: &SnapshotRow,
        source: &SandboxRow,
        timeout: u64,
    ) -> Result<CreatedSandbox, ApiError> {
        let row = SandboxRow {
            id: random_id(20),
            template_id: source.template_id.clone(),
            state: SandboxState::Starting,
            started_at: crate::store::now_rfc3339_ms(),
            end_at_ms: now_ms() + timeout as i64 * 1000,
            cpu_count: node.cpu_count,
            memory_mb: node.memory_mb,
            metadata: source.metadata.clone(),
            access_token: source.access_token.is_some().then(|| random_id(32)),
            vmm: None,
            net_slot: None,
            error: None,
            snapshot_id: Some(node.id.clone()),
            auto_pause: source.auto_pause,
            network: source.network.clone(),
        };
        // Its lifecycle options are the source's.
        if let Some(lifecycle) = self.store.lifecycle(&source.id)? {
            self.record_lifecycle(&row.id, &lifecycle)?;
        }
        let source = Source::Node(Box::new(node.clone()));
        self.start_sandbox(row, StartRequest::new(&source, timeout), OnFailure::Delete)
            .await
    }

    /// Takes a named (or anonymous) snapshot of a running sandbox, which keeps running, with its
    /// memory or (`memory` false) only its disk. Start sandboxes from it by passing its id or
    /// name as `templateID`.
    pub async fn snapshot(&self, id: &str, name: Option<String>, memory: bool) -> Result<SnapshotInfo, ApiError> {
        self.require_snapshots()?;
        if let Some(name) = &name {
            let valid = !name.is_empty()
                && name.len() <= 128
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !valid {
                return Err(ApiError::BadRequest(format!(
                    "snapshot name '{name}' is invalid: use 1 to 128 letters, digits, '-', '_' or '.'"
                )));
            }
            if self.store.snapshot(name)?.is_some()
                || self.images.find_named(name).is_ok()
                || name == viv_api::DEFAULT_TEMPLATE
            {
                return Err(ApiError::Conflict(format!(
                    "a snapshot or template named '{name}' already exists"
                )));
            }
        }
        let (node, _) = self.snapshot_running(id, SnapshotKind::Snapshot, name, memory).await?;
        self.snapshot_info(node)
    }

    pub(super) async fn snapshot_running(
        &self,
        id: &str,
        kind: SnapshotKind,
        name: Option<String>,
        memory: bool,
    ) -> Result<(SnapshotRow, SandboxRow), ApiError> {
        let (live, _) = self.running(id)?;
        let _op = live.op.lock().await;
        // Read under the lock: an operation that held it may have moved the sandbox to a node.
        let (_, mut row) = self.running(id)?;
        let started = std::time::Instant::now();
        let keep = if memory { Keep::Memory } else { Keep::Disk };
        let node = self.save_node(&live, &row, kind, name, keep, None).await?;
        row.snapshot_id = Some(node.id.clone());
        self.store.set_sandbox_snapshot(id, &node.id)?;
        tracing::info!(sandbox = %id, snapshot = %node.id, kind = kind.as_str(), bytes = node.bytes, ms = started.elapsed().as_millis() as u64, "snapshot taken");
        Ok((node, row))
    }

    /// Saves a running sandbox into a new node, with its memory or only its disk. A pause stops
    /// the VM and its overlay becomes the node's layer; otherwise the VM continues on a fresh
    /// overlay on top of that layer. `superseded` is the farthest of the parents a pause folds
    /// away afterwards: the new node's memory is taken against its parent.
    async fn save_node(
        &self,
        live: &LiveSandbox,
        row: &SandboxRow,
        kind: SnapshotKind,
        name: Option<String>,
        keep: Keep,
        superseded: Option<&SnapshotRow>,
    ) -> Result<SnapshotRow, ApiError> {
        let id = random_id(20);
        let dir = self.node_dir(&id);
        let building = dir.with_extension("building");
        std::fs::create_dir_all(&building)
            .map_err(|e| ApiError::Internal(format!("creating {}: {e}", building.display())))?;
        let keep_running = kind != SnapshotKind::Pause;
        let disk_before = live.root_disk.lock().expect("disk lock").clone();
        let result = match (keep, keep_running) {
            (Keep::Disk, _) => self.save_disk(live, &dir, &building, keep_running).await,
            // A fork syncs the state while its children start (see `fork`).
            (_, true) => {
                self.save_running(live, &dir, &building, kind != SnapshotKind::Fork)
                    .await
            }
            (Keep::Memory, false) => self.save_stopping(live, &building).await,
            (Keep::MemoryAndVm, false) => self.save_parking(live, &dir, &building).await,
        };
        if let Err(err) = result {
            if *live.root_disk.lock().expect("disk lock") == disk_before {
                let _ = std::fs::remove_dir_all(&building);
                return Err(err);
            }
            // The VM already writes to an overlay whose backing file is this node's layer, so
            // the layer is kept as a node without saved state (a restore of it is refused); it
            // is collected once the sandbox no longer needs it.
            let _ = std::fs::remove_file(building.join("state"));
            let _ = std::fs::remove_file(building.join(super::lifecycle::DISK_ONLY));
            let node = self.store_node(&building, &dir, row, SnapshotKind::Fork, None)?;
            self.store.set_sandbox_snapshot(&row.id, &node.id)?;
            return Err(err);
        }
        let node = self.store_node(&building, &dir, row, kind, name)?;
        if keep != Keep::Disk {
            // Never against a node about to be folded away: against the run's parent instead.
            let parent = match superseded {
                Some(old) => old.parent_id.as_deref(),
                None => row.snapshot_id.as_deref(),
            };
            self.queue_memory_diff(&live.run_dir, &node.id, parent);
        }
        Ok(node)
    }

    /// Moves a built node into place and records it.
    fn store_node(
        &self,
        building: &Path,
        dir: &Path,
        row: &SandboxRow,
        kind: SnapshotKind,
        name: Option<String>,
    ) -> Result<SnapshotRow, ApiError> {
        let id = dir
            .file_name()
            .expect("node dir has a name")
            .to_string_lossy()
            .into_owned();
        std::fs::rename(building, dir).map_err(|e| ApiError::Internal(format!("storing snapshot {id}: {e}")))?;
        let node = SnapshotRow {
            id,
            parent_id: row.snapshot_id.clone(),
            sandbox_id: row.id.clone(),
            template_id: row.template_id.clone(),
            kind,
            name,
            cpu_count: row.cpu_count,
            memory_mb: row.memory_mb,
            bytes: allocated_bytes(dir),
            created_at: now_rfc3339_ms(),
            guest_token: row.access_token.clone(),
            network: Some(self.config.network.to_string()),
            memory: Some(if dir.join("state").is_file() { "whole" } else { "none" }.to_owned()),
        };
        self.store.put_snapshot(&node)?;
        Ok(node)
    }

    /// Pause: flush the guest's writes (so a later boot of the disk finds them; a guest that
    /// does not answer is paused anyway), hang up the agent, save the VM (memory included), stop
    /// it, keep its overlay.
    async fn save_stopping(&self, live: &LiveSandbox, building: &Path) -> Result<(), ApiError> {
        super::lifecycle::flush_guest(live).await;
        live.agent.close().await;
        let state = building.join("state");
        if let Err(err) = live.vm.snapshot(&state, SnapshotMemory::Included).await {
            // The VM may have died (then its watcher marks the sandbox failed); otherwise it runs on.
            let _ = live.vm.resume().await;
            return Err(ApiError::Sandbox(format!("saving sandbox {}: {err}", live.id)));
        }
        // The state is whole in the page cache: the VM goes while it reaches the disk.
        let (synced, _) = tokio::join!(sync_state(live, &state), live.vm.kill());
        synced?;
        let disk = live.root_disk.lock().expect("disk lock").clone();
        let kept = building.join("disk.qcow2");
        std::fs::rename(&disk, &kept)
            .map_err(|e| ApiError::Internal(format!("keeping the disk of sandbox {}: {e}", live.id)))?;
        seal(&kept)
    }

    /// Pause that parks the VM (`parked.rs`): flush the guest's writes as
    /// [`Manager::save_stopping`] does, then save as a fork does, leaving the vCPUs stopped on
    /// a new overlay over the node's layer. The agent's connection stays open (as a fork's
    /// does): its streams stall while the VM is parked and go on if it resumes.
    async fn save_parking(&self, live: &LiveSandbox, dir: &Path, building: &Path) -> Result<(), ApiError> {
        super::lifecycle::flush_guest(live).await;
        self.save_stopped(live, dir, building, true).await?;
        sync_state(live, &building.join("state")).await
    }

    /// Fork or snapshot: stop the vCPUs, freeze the overlay as the node's layer (the VM goes on
    /// writing to a new overlay on top of it), save the VM, let it run again, and with `sync`
    /// make the state durable (else the caller does).
    async fn save_running(&self, live: &LiveSandbox, dir: &Path, building: &Path, sync: bool) -> Result<(), ApiError> {
        self.save_stopped(live, dir, building, false).await?;
        if sync {
            sync_state(live, &building.join("state")).await?;
        }
        Ok(())
    }

    /// Stops the vCPUs, freezes the overlay as the node's layer with the VM on a new overlay
    /// over it, and saves the VM; then lets it run again, unless `stay_stopped` and the save
    /// succeeded.
    async fn save_stopped(
        &self,
        live: &LiveSandbox,
        dir: &Path,
        building: &Path,
        stay_stopped: bool,
    ) -> Result<(), ApiError> {
        let vm_error =
            |what: &str, err: viv_vmm::VmError| ApiError::Sandbox(format!("{what} sandbox {}: {err}", live.id));
        live.vm.pause().await.map_err(|e| vm_error("pausing", e))?;
        let state = building.join("state");
        let result = async {
            self.swap_disk(live, &building.join("disk.qcow2"), &dir.join("disk.qcow2"))
                .await?;
            live.vm
                .snapshot(&state, SnapshotMemory::Included)
                .await
                .map_err(|e| vm_error("saving", e))
        }
        .await;
        if result.is_ok() && stay_stopped {
            return Ok(());
        }
        let resumed = live.vm.resume().await;
        result?;
        // The VM runs on while its saved state reaches the disk.
        resumed.map_err(|e| vm_error("resuming", e))
    }

    /// With the vCPUs stopped: gives the VM's overlay a second name `link` (the VM writes to it
    /// no more) and moves the VM onto a new overlay whose backing file is `backing`, the path
    /// `link` ends up at.
    pub(super) async fn swap_disk(&self, live: &LiveSandbox, link: &Path, backing: &Path) -> Result<(), ApiError> {
        let disk = live.root_disk.lock().expect("disk lock").clone();
        std::fs::hard_link(&disk, link)
            .map_err(|e| ApiError::Internal(format!("linking {} to {}: {e}", disk.display(), link.display())))?;
        let next = live.run_dir.join(format!("root-{}.qcow2", random_id(6)));
        let size = qcow2_virtual_size(&disk)?;
        super::create_overlay_unchecked(backing, &next, size).await?;
        if let Err(err) = live.vm.replace_root_disk(&next).await {
            let _ = std::fs::remove_file(&next);
            return Err(ApiError::Sandbox(format!(
                "switching the disk of sandbox {}: {err}",
                live.id
            )));
        }
        *live.root_disk.lock().expect("disk lock") = next;
        // Frozen: root's from now on, so no VM given this uid later can write it.
        seal(link)
    }

    fn snapshot_info(&self, node: SnapshotRow) -> Result<SnapshotInfo, ApiError> {
        let (children, sandboxes) = self.store.snapshot_users(&node.id)?;
        // E2B's form: `NAME:default`, or `ID:default` for a snapshot without a name.
        let names: Vec<String> = node.name.iter().map(|n| format!("{n}:{SNAPSHOT_TAG}")).collect();
        let snapshot_id = names
            .first()
            .cloned()
            .unwrap_or_else(|| format!("{}:{SNAPSHOT_TAG}", node.id));
        Ok(SnapshotInfo {
            snapshot_id,
            names,
            parent_id: node.parent_id,
            sandbox_id: node.sandbox_id,
            template_id: node.template_id,
            kind: node.kind.as_str().to_owned(),
            size_bytes: node.bytes,
            // As its node recorded it: this server may not have the node's files.
            memory: match node.memory {
                Some(memory) => memory,
                None => self.node_memory_kind(&node.id).to_owned(),
            },
            created_at: node.created_at,
            children,
            sandboxes,
        })
    }

    /// Snapshot nodes, oldest first, optionally only those taken of one sandbox or the one of
    /// a name (`NAME` or `NAME:default`), with what `GET /snapshots` shows of each.
    pub fn snapshot_nodes(
        &self,
        sandbox_id: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<(SnapshotRow, SnapshotInfo)>, ApiError> {
        let name = name.map(crate::store::untagged);
        self.store
            .snapshots()?
            .into_iter()
            .filter(|n| sandbox_id.is_none_or(|s| n.sandbox_id == s))
            .filter(|n| name.is_none_or(|name| n.name.as_deref() == Some(name)))
            .map(|n| Ok((n.clone(), self.snapshot_info(n)?)))
            .collect()
    }

    /// One snapshot node by id or name.
    pub fn get_snapshot(&self, id: &str) -> Result<SnapshotInfo, ApiError> {
        let node = self.store.snapshot(id)?.ok_or_else(|| snapshot_not_found(id))?;
        self.snapshot_info(node)
    }

    /// Deletes a node nothing depends on, or takes the name of a named snapshot still in use
    /// (it is collected once nothing needs it).
    pub fn delete_snapshot(&self, id: &str) -> Result<(), ApiError> {
        let node = self.store.snapshot(id)?.ok_or_else(|| snapshot_not_found(id))?;
        let (children, sandboxes) = self.store.snapshot_users(&node.id)?;
        if (!children.is_empty() || !sandboxes.is_empty()) && node.kind == SnapshotKind::Snapshot {
            // As in E2B, a snapshot is deleted while sandboxes run from it: its name goes at
            // once, its disk and state when nothing needs them any more.
            self.store.demote_snapshot(&node.id)?;
            tracing::info!(snapshot = %node.id, "snapshot deleted; kept as a fork node while in use");
            return Ok(());
        }
        if !children.is_empty() || !sandboxes.is_empty() {
            let mut users = Vec::new();
            if !children.is_empty() {
                users.push(format!("snapshots {}", children.join(", ")));
            }
            if !sandboxes.is_empty() {
                users.push(format!("sandboxes {}", sandboxes.join(", ")));
            }
            return Err(ApiError::Conflict(format!(
                "snapshot '{id}' is still needed by {}; delete or kill those first",
                users.join(" and ")
            )));
        }
        self.remove_node(&node)?;
        self.collect_snapshots();
        Ok(())
    }

    fn remove_node(&self, node: &SnapshotRow) -> Result<(), ApiError> {
        self.drop_replicas(&node.id)?;
        self.store.delete_snapshot(&node.id)?;
        let _ = std::fs::remove_dir_all(self.node_dir(&node.id));
        tracing::info!(snapshot = %node.id, kind = node.kind.as_str(), "snapshot deleted");
        Ok(())
    }

    /// Deletes `pause` and `fork` nodes that nothing depends on any more, up the tree (those
    /// whose files are here: another node of the cluster collects its own).
    pub(super) fn collect_snapshots(&self) {
        loop {
            let Ok(nodes) = self.store.local_snapshots() else {
                return;
            };
            let mut removed = false;
            for node in nodes.iter().filter(|n| n.kind != SnapshotKind::Snapshot) {
                if let Ok((children, sandboxes)) = self.store.snapshot_users(&node.id) {
                    if children.is_empty() && sandboxes.is_empty() && self.remove_node(node).is_ok() {
                        removed = true;
                    }
                }
            }
            if !removed {
                self.collect_memory_bases();
                return;
            }
        }
    }

    /// At start: removes node directories that are neither this node's nor its copies of other
    /// nodes' (a save the crash interrupted, an export copy, a snapshot another node adopted).
    pub(super) fn recover_snapshots(&self) -> Result<(), ApiError> {
        let root = self.config.data_dir.join("snapshots");
        std::fs::create_dir_all(&root).map_err(|e| ApiError::Internal(format!("creating {}: {e}", root.display())))?;
        // Only this node's: a snapshot another node adopted while this one was away goes too.
        let mut known: std::collections::HashSet<String> =
            self.store.local_snapshots()?.into_iter().map(|n| n.id).collect();
        known.extend(self.store.local_replicas()?);
        for entry in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !known.contains(&name) {
                tracing::warn!(dir = %entry.path().display(), "removing an unfinished snapshot");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        self.recover_memory_bases();
        self.collect_snapshots();
        Ok(())
    }
}

fn snapshot_not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!(
        "snapshot '{id}' not found; `viv snapshot list` shows the existing ones"
    ))
}

/// Bytes the files of `dir` occupy on disk (allocated blocks, so sparse files count what they use).
pub(super) fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Syncs the state `live`'s VM saved at `state` (see [`viv_vmm::Vm::snapshot`]): the node
/// holding it is stored only once this succeeds.
async fn sync_state(live: &LiveSandbox, state: &Path) -> Result<(), ApiError> {
    viv_vmm::sync_file(state)
        .await
        .map_err(|e| ApiError::Internal(format!("writing the state of sandbox {}: {e}", live.id)))
}

/// Makes a frozen file (a disk layer) root's and read-only to VMs.
pub(super) fn seal(path: &Path) -> Result<(), ApiError> {
    viv_vmm::confine::seal(path).map_err(|e| ApiError::Internal(format!("sealing {}: {e}", path.display())))
}

/// The virtual size recorded in a qcow2 header (big-endian u64 at offset 24).
fn qcow2_virtual_size(path: &Path) -> Result<u64, ApiError> {
    use std::io::Read as _;
    let mut header = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut header))
        .map_err(|e| ApiError::Internal(format!("reading the qcow2 header of {}: {e}", path.display())))?;
    if &header[..4] != b"QFI\xfb" {
        return Err(ApiError::Internal(format!("{} is not a qcow2 image", path.display())));
    }
    Ok(u64::from_be_bytes(header[24..32].try_into().expect("8 bytes")))
}
