//! The source side of a live migration: `POST /vms/{id}/migrate` moves a running VM, with its
//! disks, to another Vivarium server while it runs, as an operation with progress.
//!
//! Steps (the VM's gate held throughout, so no stop, edit or snapshot runs beside it):
//! 1. checks here and on the target (reachable, key accepted, VM name free) before the
//!    operation starts, so the common mistakes are direct errors;
//! 2. the target receives the VM (`POST /migrations/incoming`): definition, empty disks, its
//!    QEMU waiting in its own jail;
//! 3. the source QEMU connects to Unix sockets this server listens on in the VM's run directory;
//!    each connection is relayed over an upgraded HTTP connection to the target, which splices
//!    it to its QEMU's socket (NBD for the disks, the migration stream for RAM);
//! 4. `blockdev-mirror` copies the disks while the guest runs (write-blocking: once in sync,
//!    every guest write reaches both); then RAM is migrated (the guest stops only for QEMU's
//!    last pass); then the mirrors are completed;
//! 5. the target finishes (`POST /migrations/incoming/{id}/finish`): its VM runs;
//! 6. only then does the source stop its QEMU and delete the VM, its files and its disks.
//!
//! Invariants (who owns the VM when):
//! - until step 5 succeeds the VM is the source's: on any failure before, the target's VM is
//!   deleted (`DELETE /migrations/incoming/{id}`; the target also deletes it by itself after
//!   its deadline) and the source's guest runs on with its disks active;
//! - after step 5 it is the target's: the source never resumes it, and its copy is deleted;
//! - the target key is kept in memory for the operation only.
//!
//! Between nodes of one cluster (`{"node": NAME}`) the steps are the same over the node API
//! (`/internal/migrations/…`, the cluster's secret), and the VM keeps its id and row: the
//! target takes the row over in step 5 (one conditional update naming the source node, so only
//! one node ever holds it), and in step 6 the source deletes only its files and disks. A node
//! writes a VM row's runtime state only while the row names it (`Store::set_vm_exited`), so the
//! source's QEMU quitting cannot mark the moved VM stopped.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use tokio::task::JoinSet;
use viv_api::storage::{Operation, OperationKind};
use viv_api::vms::{IncomingDisk, IncomingVm, MigrationFigures, VmMigrate, VmState};

use super::migrate_remote::{remote_error, Remote};
use super::operations::{OperationHandle, OperationResult};
use super::vm_runtime::LiveVm;
use super::vms::{definition_of, state_of};
use super::Manager;
use crate::error::ApiError;

/// Longest the disks may take to come in sync.
const DISK_COPY_TIMEOUT: Duration = Duration::from_secs(60 * 60);
/// Longest the RAM migration may take.
const RAM_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// The source's sockets for its QEMU, in the VM's run directory.
const OUT_RAM_SOCKET: &str = "migrate-out.sock";
const OUT_NBD_SOCKET: &str = "migrate-nbd.sock";

impl Manager {
    /// Starts moving running VM `id_or_name` to the server `req.target`; returns the operation.
    pub async fn migrate_vm(self: &Arc<Self>, id_or_name: &str, req: VmMigrate) -> Result<Operation, ApiError> {
        let (remote, to_node) = match (&req.node, &req.target, &req.target_key) {
            (Some(node), None, None) => {
                let (remote, node) = self.cluster_remote(node)?;
                (remote, Some(node))
            }
            (None, Some(target), Some(key)) => (Remote::parse(target, key)?, None),
            _ => {
                return Err(ApiError::BadRequest(
                    "give either node (another node of this cluster) or target and targetKey (another server)".into(),
                ))
            }
        };
        let row = self.vm_row(id_or_name)?;
        let state = state_of(&row)?;
        if let (Some(node), false) = (&to_node, state.is_active()) {
            // A stopped VM moves between nodes by copying its disks (`vm_move.rs`).
            self.check_migratable(&row, true).await?;
            self.check_operation_room()?;
            let (manager, id, node) = (self.clone(), row.id.clone(), node.clone());
            return self.start_operation_with(OperationKind::Migrate, &row.name, move |_handle| async move {
                manager
                    .move_stopped_vm(&id, &remote, &node)
                    .await
                    .map(OperationResult::Migration)
            });
        }
        if state != VmState::Running {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is {}: only a running VM migrates live (start it, or copy its disks and definition)",
                row.name,
                state.as_str()
            )));
        }
        self.check_migratable(&row, to_node.is_some()).await?;
        if to_node.is_none() {
            let (status, body) = remote.call(Method::GET, &format!("/vms/{}", row.name), None).await?;
            match status {
                StatusCode::NOT_FOUND => {}
                StatusCode::OK => {
                    return Err(ApiError::Conflict(format!(
                        "the target server {} has a VM named '{}' already",
                        remote.url(),
                        row.name
                    )))
                }
                other => return Err(remote_error(other, &body, "the migration")),
            }
        }
        self.check_operation_room()?;
        let manager = self.clone();
        let id = row.id.clone();
        self.start_operation_with(OperationKind::Migrate, &row.name, move |handle| async move {
            manager
                .migrate_locked(&id, &remote, to_node.as_deref(), &handle)
                .await
                .map(OperationResult::Migration)
        })
    }

    /// The node API of node `name` (another node of this cluster, up and running VMs), and its
    /// name.
    fn cluster_remote(&self, name: &str) -> Result<(Remote, String), ApiError> {
        let link = self.cluster_link.get().ok_or_else(|| {
            ApiError::BadRequest("this server is not part of a cluster: give target and targetKey".into())
        })?;
        let node = self
            .store
            .node(name)?
            .ok_or_else(|| ApiError::NotFound(format!("no node '{name}' in this cluster (see GET /nodes)")))?;
        if node.id == link.node_id {
            return Err(ApiError::Conflict(format!("the VM is on node '{}' already", node.name)));
        }
        if node.state != viv_api::nodes::NodeState::Up || !node.runs_vms() {
            return Err(ApiError::Conflict(format!(
                "node '{}' takes no VM: it is {} with role {}",
                node.name,
                node.state.as_str(),
                node.role
            )));
        }
        Ok((Remote::node(&node.url, &link.secret)?, node.name))
    }

    /// 409 for what cannot move: edits pending, snapshots, shareable writable disks, and to
    /// another node of the cluster, backups (their files stay on this node).
    pub(super) async fn check_migratable(&self, row: &crate::store::VmRow, to_node: bool) -> Result<(), ApiError> {
        if row.pending_definition.is_some() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' has edits waiting for its next start: restart it (or revert them) before migrating",
                row.name
            )));
        }
        if !self.list_vm_snapshots(&row.id)?.is_empty() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' has snapshots, which do not migrate: delete them first",
                row.name
            )));
        }
        if to_node && !self.store.vm_backups(&row.id)?.is_empty() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' has backups, whose files stay on this node: delete them (or restore and delete) before moving it",
                row.name
            )));
        }
        let def = definition_of(&row.definition)?;
        if let Some(disk) = def.disks.iter().find(|d| d.shareable && !d.read_only) {
            return Err(ApiError::Conflict(format!(
                "VM '{}': disk '{}' is shareable and writable: it cannot be copied while another VM writes it",
                row.name, disk.disk
            )));
        }
        // Its disks leave this node: none may back a linked clone that stays.
        for disk in def.disks.iter().filter(|d| !d.read_only) {
            let children = self
                .storage
                .disk_children(&disk.disk)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            if !children.is_empty() {
                return Err(ApiError::Conflict(format!(
                    "VM '{}': disk '{}' is the base of linked clones ({}), which stay on this node: \
                     make them full copies (or delete them) before moving the VM",
                    row.name,
                    disk.disk,
                    children.join(", ")
                )));
            }
        }
        Ok(())
    }

    async fn migrate_locked(
        self: &Arc<Self>,
        id: &str,
        remote: &Remote,
        to_node: Option<&str>,
        handle: &OperationHandle,
    ) -> Result<MigrationFigures, ApiError> {
        let started = Instant::now();
        let (row, _held) = self.lock_vm(id).await?;
        let live = self.live_of(&row)?;
        if state_of(&row)? != VmState::Running {
            return Err(ApiError::Conflict(format!("VM '{}' is not running any more", row.name)));
        }
        self.check_migratable(&row, to_node.is_some()).await?;
        let def = definition_of(&row.definition)?;
        let writable = def.disks.iter().filter(|d| !d.read_only).count();
        if live.machine.started_writable_disks() != writable {
            return Err(ApiError::Conflict(format!(
                "VM '{}' had disks added or removed while it runs: restart it before migrating",
                row.name
            )));
        }
        // The target starts every disk and vCPU of the definition at boot.
        self.check_devices_as_started(&row.name, &live).await?;
        let mut disks = Vec::new();
        for disk in def.disks.iter().filter(|d| !d.read_only) {
            let info = self.storage.disk_info(&disk.disk).await.map_err(|e| {
                super::storage::api(e.kind(), format!("disk '{}' of VM '{}': {e}", disk.disk, row.name))
            })?;
            disks.push(IncomingDisk {
                name: disk.disk.clone(),
                size_bytes: info.virtual_size,
                format: match info.format {
                    viv_storage::DiskFormat::Qcow2 => viv_api::storage::DiskFormat::Qcow2,
                    viv_storage::DiskFormat::Raw => viv_api::storage::DiskFormat::Raw,
                },
            });
        }
        let incoming = IncomingVm {
            name: row.name.clone(),
            definition: def.clone(),
            disks: disks.clone(),
            takeover_from: to_node.map(|_| self.node_id().to_owned()),
        };
        let body = serde_json::to_value(&incoming).map_err(|e| ApiError::Internal(e.to_string()))?;
        let (status, answer) = remote.call(Method::POST, "/migrations/incoming", Some(&body)).await?;
        if status != StatusCode::CREATED {
            return Err(remote_error(status, &answer, "to receive the VM"));
        }
        let incoming_id = answer["id"]
            .as_str()
            .filter(|s| s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .ok_or_else(|| ApiError::Sandbox("the target server answered without a valid incoming id".into()))?
            .to_owned();
        tracing::info!(vm = %row.id, target = %remote.url(), incoming = %incoming_id, "VM migration started");
        let moved = self.send_vm(&live, remote, &incoming_id, handle).await;
        let figures = match moved {
            Ok(figures) => figures,
            Err(err) => {
                tracing::warn!(vm = %row.id, error = %err, "VM migration failed; the VM runs on here");
                if let Err(e) = live.machine.abort_migration().await {
                    tracing::warn!(vm = %row.id, error = %e, "resuming the VM after a failed migration");
                }
                let path = format!("/migrations/incoming/{incoming_id}");
                if let Err(e) = remote.call(Method::DELETE, &path, None).await {
                    tracing::warn!(vm = %row.id, error = %e, "the target did not delete its half-made VM (it expires there)");
                }
                return Err(err);
            }
        };
        // The VM runs on the target now: this copy goes (its row too, unless the target, a node
        // of this cluster, took it over).
        let whereto = to_node.map_or_else(|| remote.url(), |n| format!("node {n}"));
        live.ask_to_stop(format!("migrated to {whereto}"));
        if live.machine.quit().await.is_err() {
            let _ = live.machine.kill().await;
        }
        live.exit_recorded().await;
        if to_node.is_none() {
            let row = self.vm_row(id)?;
            self.delete_vm_row(&row)?;
        }
        let names: Vec<String> = disks.iter().map(|d| d.name.clone()).collect();
        self.remove_vm_files(id, &names).await;
        let figures = MigrationFigures {
            total_ms: started.elapsed().as_millis() as u64,
            ..figures
        };
        tracing::info!(vm = %id, target = %remote.url(), ?figures, "VM migrated");
        Ok(figures)
    }

    /// Steps 3 to 5: relays, disk mirror, RAM, the target's finish.
    async fn send_vm(
        &self,
        live: &Arc<LiveVm>,
        remote: &Remote,
        incoming: &str,
        handle: &OperationHandle,
    ) -> Result<MigrationFigures, ApiError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| ApiError::Internal(format!("migrating: {what}: {e}"));
        let mut relays = JoinSet::new();
        let nbd = live.machine.run_socket(OUT_NBD_SOCKET);
        let ram = live.machine.run_socket(OUT_RAM_SOCKET);
        let uid = live.machine.uid();
        for (path, channel) in [(&nbd, "nbd"), (&ram, "ram")] {
            let listener = listen(path, uid).map_err(|e| failed("listening for the VM's QEMU", &e))?;
            relays.spawn(relay(
                listener,
                remote.clone(),
                format!("/migrations/incoming/{incoming}/{channel}"),
            ));
        }
        let result = async {
            let mut disk_progress = |done: u64, total: u64| {
                if total > 0 {
                    handle.progress(0.5 * done as f64 / total as f64);
                }
            };
            let copy_started = Instant::now();
            live.machine
                .mirror_disks(&nbd, DISK_COPY_TIMEOUT, &mut disk_progress)
                .await
                .map_err(|e| failed("copying the disks", &e))?;
            let disk_copy_ms = copy_started.elapsed().as_millis() as u64;
            let mut ram_progress = |p: viv_vmm::machine::MigrationProgress| {
                if p.total > 0 {
                    handle.progress(0.5 + 0.45 * (p.transferred as f64 / p.total as f64).min(1.0));
                }
            };
            let stats = live
                .machine
                .migrate_out(&ram, RAM_TIMEOUT, &mut ram_progress)
                .await
                .map_err(|e| failed("sending memory and devices", &e))?;
            live.machine
                .end_mirrors()
                .await
                .map_err(|e| failed("completing the disk copies", &e))?;
            let (status, answer) = remote
                .call(Method::POST, &format!("/migrations/incoming/{incoming}/finish"), None)
                .await?;
            if status != StatusCode::OK {
                return Err(remote_error(status, &answer, "to run the migrated VM"));
            }
            Ok(MigrationFigures {
                total_ms: 0,
                disk_copy_ms,
                ram_ms: stats.total_ms,
                downtime_ms: stats.downtime_ms,
                ram_bytes: stats.transferred,
            })
        }
        .await;
        relays.abort_all();
        for path in [&nbd, &ram] {
            let _ = std::fs::remove_file(path);
        }
        result
    }
}

/// A Unix listener at `path` that QEMU (running as `uid`) may connect to.
fn listen(path: &Path, uid: u32) -> std::io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = tokio::net::UnixListener::bind(path)?;
    // SAFETY: geteuid has no preconditions.
    if uid != unsafe { libc::geteuid() } {
        std::os::unix::fs::chown(path, Some(uid), None)?;
    }
    Ok(listener)
}

/// Relays every connection QEMU makes to `listener` over a new channel to the target.
async fn relay(listener: tokio::net::UnixListener, remote: Remote, path: String) {
    let mut copies = JoinSet::new();
    loop {
        let Ok((mut local, _)) = listener.accept().await else {
            return;
        };
        let remote = remote.clone();
        let path = path.clone();
        copies.spawn(async move {
            match remote.channel(&path).await {
                Ok(mut far) => {
                    if let Err(err) = tokio::io::copy_bidirectional(&mut local, &mut far).await {
                        tracing::debug!(channel = %path, error = %err, "a migration channel ended");
                    }
                }
                Err(err) => tracing::warn!(channel = %path, error = %err, "opening a migration channel failed"),
            }
        });
    }
}
