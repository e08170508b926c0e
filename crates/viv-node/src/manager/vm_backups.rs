//! Backups of VMs' disks: full and incremental qcow2 files per writable disk, taken while the
//! VM runs (its QEMU's `blockdev-backup` jobs) or while it is stopped (the same jobs in a
//! `qemu-storage-daemon` over its disks), listed, deleted and restored into new pool disks or
//! over the VM's own disks.
//!
//! Files: `DATA_DIR/backups/VM-ID/BACKUP-ID-N.qcow2`, N the disk's place among the backed-up
//! disks; an incremental backup's file N is backed by its parent's file N (a bare file name in
//! the same directory, written by us: never a path from a client). A persistent dirty bitmap
//! per disk (`viv-bk-...`, recorded in the row) marks what changed since the last backup.
//!
//! Invariants:
//! - a backup holds its VM's gate while it runs, so no start, stop or edit changes the disks'
//!   set under it;
//! - files are written under `.tmp-` names, linked into place only when every disk's copy
//!   succeeded, and the row is inserted last: a listed backup is complete, and a crash leaves
//!   only files that [`Manager::sweep_vm_backups`] removes at the next start;
//! - the previous backup's bitmap is removed only after the new row is stored (see
//!   `viv_vmm::backup`), so no change is ever missed by the next incremental backup; an
//!   incremental backup is taken only when every disk still has that bitmap, consistent, and the
//!   VM backs up the same disks as before (`kind: auto` falls back to a full backup);
//! - only writable, non-shareable qcow2 disks are backed up (a shared disk's writes by another VM
//!   would escape the bitmap; raw images cannot hold one);
//! - deleting a backup that another one is based on first rebases that child onto the deleted
//!   one's parent (`qemu-img rebase`, safe mode), so every listed backup stays restorable.

use std::path::PathBuf;
use std::sync::Arc;

use viv_api::backups::{BackupDiskInfo, BackupKind, NewVmBackup, RestoreVmBackup, VmBackup};
use viv_api::storage::{Operation, OperationKind};
use viv_vmm::backup::{self as vmm_backup, BackupDisk, BackupError, BackupSync, StorageDaemon, BITMAP_PREFIX};

use super::operations::{OperationHandle, OperationResult};
use super::storage::{api, describe_vms};
use super::vms::{definition_of, state_of};
use super::Manager;
use crate::error::ApiError;
use crate::store::{VmBackupRow, VmRow};

/// A disk as a backup row records it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredDisk {
    disk: String,
    virtual_size: u64,
}

impl Manager {
    fn backups_dir(&self, vm_id: &str) -> PathBuf {
        self.config.data_dir.join("backups").join(vm_id)
    }

    fn backup_file(&self, vm_id: &str, backup: &str, n: usize) -> PathBuf {
        self.backups_dir(vm_id).join(backup_file_name(backup, n))
    }

    /// A VM's backups, oldest first.
    pub fn list_vm_backups(&self, vm: &str) -> Result<Vec<VmBackup>, ApiError> {
        let row = self.vm_row(vm)?;
        self.store
            .vm_backups(&row.id)?
            .iter()
            .map(|b| self.backup_info(b))
            .collect()
    }

    fn backup_row(&self, vm: &VmRow, backup: &str) -> Result<VmBackupRow, ApiError> {
        self.store
            .vm_backup(&vm.id, backup)?
            .ok_or_else(|| ApiError::NotFound(format!("VM '{}' has no backup '{backup}'", vm.name)))
    }

    fn backup_info(&self, row: &VmBackupRow) -> Result<VmBackup, ApiError> {
        let disks = stored_disks(row)?;
        Ok(VmBackup {
            id: row.id.clone(),
            vm_id: row.vm_id.clone(),
            kind: if row.kind == "incremental" {
                BackupKind::Incremental
            } else {
                BackupKind::Full
            },
            parent_id: row.parent_id.clone(),
            disks: disks
                .into_iter()
                .enumerate()
                .map(|(n, d)| BackupDiskInfo {
                    file_size: std::fs::metadata(self.backup_file(&row.vm_id, &row.id, n))
                        .map(|m| m.len())
                        .unwrap_or(0),
                    disk: d.disk,
                    virtual_size: d.virtual_size,
                })
                .collect(),
            live: row.live,
            created_at: row.created_at.clone(),
        })
    }

    /// Starts a backup of VM `vm` as an operation.
    pub fn start_vm_backup(self: &Arc<Self>, vm: &str, req: NewVmBackup) -> Result<Operation, ApiError> {
        let row = self.vm_row(vm)?;
        self.check_operation_room()?;
        let id = row.id.clone();
        self.start_operation_with(OperationKind::Backup, &row.name, move |op| async move {
            let manager = op.manager().clone();
            let backup = manager.take_vm_backup(&id, req.kind, &op).await?;
            Ok(OperationResult::Backup(Box::new(backup)))
        })
    }

    async fn take_vm_backup(
        self: &Arc<Self>,
        vm: &str,
        kind: BackupKind,
        op: &OperationHandle,
    ) -> Result<VmBackup, ApiError> {
        let (row, _held) = self.lock_vm(vm).await?;
        let def = definition_of(&row.definition)?;
        // (device id, pool disk) of each disk backed up.
        let disks: Vec<(String, String)> = def
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.read_only && !d.shareable)
            .map(|(i, d)| (format!("disk{i}"), d.disk.clone()))
            .collect();
        if disks.is_empty() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' has no writable, non-shareable disk to back up",
                row.name
            )));
        }
        let mut stored = Vec::new();
        let mut paths = Vec::new();
        for (_, disk) in &disks {
            let info = self
                .storage
                .disk_info(disk)
                .await
                .map_err(|e| api(e.kind(), format!("VM '{}': {e}", row.name)))?;
            if info.format != viv_storage::DiskFormat::Qcow2 {
                return Err(ApiError::Conflict(format!(
                    "VM '{}': disk '{disk}' is raw: backups need qcow2 disks (clone it to a qcow2 disk first)",
                    row.name
                )));
            }
            stored.push(StoredDisk {
                disk: disk.clone(),
                virtual_size: info.virtual_size,
            });
            paths.push(info.path);
        }
        let previous = self.store.vm_backups(&row.id)?.pop();
        let same_disks = previous
            .as_ref()
            .and_then(|p| stored_disks(p).ok())
            .is_some_and(|p| p.iter().map(|d| &d.disk).eq(stored.iter().map(|d| &d.disk)));
        let parent = match (kind, &previous) {
            (BackupKind::Full, _) => None,
            (BackupKind::Incremental, None) => {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' has no backup yet: take a full backup first",
                    row.name
                )))
            }
            (BackupKind::Incremental, Some(_)) if !same_disks => {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' has other disks than at its last backup: take a full backup",
                    row.name
                )))
            }
            (_, previous) => previous.clone().filter(|_| same_disks),
        };
        let live = self.vm_runtime.get(&row.id);
        let dir = self.backups_dir(&row.id);
        std::fs::create_dir_all(&dir).map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
        let backup_id = format!("bk-{}", super::random_id(12));
        let bitmap = format!("{BITMAP_PREFIX}{}", &backup_id[3..]);
        let temps = TempFiles(
            (0..disks.len())
                .map(|n| dir.join(format!(".tmp-{}", backup_file_name(&backup_id, n))))
                .collect(),
        );
        let mut progress = |f: f64| op.progress(f * 0.95);
        // What runs the jobs: the VM's QEMU, or a storage daemon over the stopped VM's disks.
        let daemon = match &live {
            Some(_) => None,
            None => {
                let nodes: Vec<(String, PathBuf)> = disks
                    .iter()
                    .zip(&paths)
                    .map(|((id, _), path)| (viv_vmm::machine::Machine::disk_format_node(id), path.clone()))
                    .collect();
                let socket = dir.join(format!(".tmp-{backup_id}.qsd"));
                Some(
                    StorageDaemon::start(&socket, &nodes)
                        .await
                        .map_err(|e| backup_error(&row.name, e))?,
                )
            }
        };
        let result = self
            .run_backup_jobs(
                &row,
                &disks,
                &stored,
                parent.as_ref(),
                kind,
                &temps,
                &bitmap,
                live.as_ref(),
                daemon.as_ref(),
                &mut progress,
            )
            .await;
        let outcome = match result {
            Ok(sync_parent) => {
                let published =
                    self.publish_backup(&row, &temps, &backup_id, sync_parent, &stored, &bitmap, live.is_some());
                if published.is_ok() {
                    // The new bitmap now follows the newest backup; older ones are not needed.
                    let ids: Vec<String> = disks.iter().map(|(id, _)| id.clone()).collect();
                    let pruned = match (&live, &daemon) {
                        (Some(live), _) => live.machine.prune_backup_bitmaps(&ids, Some(&bitmap)).await,
                        (None, Some(daemon)) => {
                            let nodes: Vec<String> = ids
                                .iter()
                                .map(|id| viv_vmm::machine::Machine::disk_format_node(id))
                                .collect();
                            vmm_backup::remove_bitmaps_except(&daemon.qmp, &nodes, Some(&bitmap)).await
                        }
                        (None, None) => Ok(()),
                    };
                    if let Err(err) = pruned {
                        tracing::warn!(vm = %row.id, error = %err, "removing older backup bitmaps");
                    }
                }
                published
            }
            Err(e) => Err(e),
        };
        if let Some(daemon) = daemon {
            if let Err(err) = daemon.quit().await {
                tracing::warn!(vm = %row.id, error = %err, "the storage daemon of a backup did not quit cleanly; the next backup of this VM is full");
            }
        }
        let backup = outcome?;
        tracing::info!(vm = %row.id, backup = %backup.id, kind = backup.kind.as_str(), "VM backup taken");
        Ok(backup)
    }

    /// Creates the target files and runs the jobs; returns the parent the backup was taken
    /// against (`None`: full).
    #[allow(clippy::too_many_arguments)]
    async fn run_backup_jobs(
        &self,
        row: &VmRow,
        disks: &[(String, String)],
        stored: &[StoredDisk],
        parent: Option<&VmBackupRow>,
        kind: BackupKind,
        temps: &TempFiles,
        bitmap: &str,
        live: Option<&Arc<super::vm_runtime::LiveVm>>,
        daemon: Option<&StorageDaemon>,
        progress: &mut (dyn FnMut(f64) + Send),
    ) -> Result<Option<String>, ApiError> {
        let qmp = match (live, daemon) {
            (Some(live), _) => Some(QmpOf::Machine(live)),
            (None, Some(daemon)) => Some(QmpOf::Daemon(&daemon.qmp)),
            (None, None) => None,
        }
        .ok_or_else(|| ApiError::Internal("no QEMU to run the backup".into()))?;
        let nodes: Vec<String> = disks
            .iter()
            .map(|(id, _)| viv_vmm::machine::Machine::disk_format_node(id))
            .collect();
        // An incremental backup needs the parent's bitmap in every disk.
        let parent = match parent {
            Some(p) => {
                let usable = match &qmp {
                    QmpOf::Machine(live) => live.machine.check_backup_bitmap(&nodes, &p.bitmap).await,
                    QmpOf::Daemon(q) => vmm_backup::check_bitmap(q, &nodes, &p.bitmap).await,
                };
                match usable {
                    Ok(()) => Some(p),
                    // `auto`: no bitmap to follow (a restore, an unclean stop) means a full backup.
                    Err(BackupError::NoBitmap { .. }) if kind == BackupKind::Auto => None,
                    Err(e @ BackupError::NoBitmap { .. }) => {
                        return Err(ApiError::Conflict(format!("VM '{}': {e}", row.name)));
                    }
                    Err(e) => return Err(backup_error(&row.name, e)),
                }
            }
            None => None,
        };
        for (n, disk) in stored.iter().enumerate() {
            let mut args: Vec<std::ffi::OsString> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
            if let Some(p) = parent {
                args.extend([
                    "-b".into(),
                    backup_file_name(&p.id, n).into(),
                    "-F".into(),
                    "qcow2".into(),
                ]);
            }
            args.extend([
                temps.0[n].clone().into_os_string(),
                disk.virtual_size.to_string().into(),
            ]);
            viv_storage::qemu_img::run(&args)
                .await
                .map_err(|e| ApiError::Internal(format!("VM '{}': creating a backup file: {e}", row.name)))?;
        }
        let sync = match parent {
            Some(p) => BackupSync::Since(&p.bitmap),
            None => BackupSync::Full,
        };
        let done = match qmp {
            QmpOf::Machine(live) => {
                let mut files = Vec::new();
                for ((id, _), path) in disks.iter().zip(&temps.0) {
                    let file = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(path)
                        .map_err(|e| ApiError::Internal(format!("opening {}: {e}", path.display())))?;
                    files.push((id.clone(), file));
                }
                live.machine.backup(&files, sync, bitmap, progress).await
            }
            QmpOf::Daemon(q) => {
                let targets: Vec<BackupDisk> = nodes
                    .iter()
                    .zip(&temps.0)
                    .map(|(node, path)| BackupDisk {
                        node: node.clone(),
                        target: path.to_string_lossy().into_owned(),
                    })
                    .collect();
                vmm_backup::run_backup(q, &targets, sync, bitmap, progress).await
            }
        };
        done.map_err(|e| match e {
            e @ BackupError::NoBitmap { .. } => ApiError::Conflict(format!("VM '{}': {e}", row.name)),
            e => backup_error(&row.name, e),
        })?;
        Ok(parent.map(|p| p.id.clone()))
    }

    /// Links the finished files into place, then records the backup.
    #[allow(clippy::too_many_arguments)]
    fn publish_backup(
        &self,
        row: &VmRow,
        temps: &TempFiles,
        backup_id: &str,
        parent: Option<String>,
        stored: &[StoredDisk],
        bitmap: &str,
        live: bool,
    ) -> Result<VmBackup, ApiError> {
        let mut linked = TempFiles(Vec::new());
        for (n, temp) in temps.0.iter().enumerate() {
            let dest = self.backup_file(&row.id, backup_id, n);
            let done = std::fs::File::open(temp)
                .and_then(|f| f.sync_all())
                .and_then(|()| std::fs::hard_link(temp, &dest));
            done.map_err(|e| ApiError::Internal(format!("storing {}: {e}", dest.display())))?;
            linked.0.push(dest);
        }
        if let Ok(dir) = std::fs::File::open(self.backups_dir(&row.id)) {
            let _ = dir.sync_all();
        }
        let record = VmBackupRow {
            id: backup_id.to_owned(),
            vm_id: row.id.clone(),
            kind: if parent.is_some() { "incremental" } else { "full" }.to_owned(),
            parent_id: parent,
            disks: serde_json::to_string(stored).map_err(|e| ApiError::Internal(e.to_string()))?,
            bitmap: bitmap.to_owned(),
            live,
            created_at: String::new(),
        };
        let record = self.store.insert_vm_backup(&record)?;
        linked.0.clear();
        self.backup_info(&record)
    }

    /// Deletes a backup; a backup based on it is rebased onto its parent first.
    pub async fn delete_vm_backup(self: &Arc<Self>, vm: &str, backup: &str) -> Result<(), ApiError> {
        let (row, _held) = self.lock_vm(vm).await?;
        let target = self.backup_row(&row, backup)?;
        let count = stored_disks(&target)?.len();
        let child = self
            .store
            .vm_backups(&row.id)?
            .into_iter()
            .find(|b| b.parent_id.as_deref() == Some(target.id.as_str()));
        if let Some(child) = &child {
            for n in 0..count {
                let new_backing = target
                    .parent_id
                    .as_ref()
                    .map(|p| backup_file_name(p, n))
                    .unwrap_or_default();
                let mut args: Vec<std::ffi::OsString> = vec![
                    "rebase".into(),
                    "-q".into(),
                    "-f".into(),
                    "qcow2".into(),
                    "-b".into(),
                    new_backing.into(),
                ];
                if target.parent_id.is_some() {
                    args.extend(["-F".into(), "qcow2".into()]);
                }
                args.push(self.backup_file(&row.id, &child.id, n).into_os_string());
                viv_storage::qemu_img::run(&args).await.map_err(|e| {
                    ApiError::Internal(format!(
                        "backup '{}' of VM '{}' could not be merged into backup '{}': {e}",
                        target.id, row.name, child.id
                    ))
                })?;
            }
        }
        self.store.delete_vm_backup(&target, "full")?;
        for n in 0..count {
            let _ = std::fs::remove_file(self.backup_file(&row.id, &target.id, n));
        }
        tracing::info!(vm = %row.id, backup = %target.id, "VM backup deleted");
        Ok(())
    }

    /// Removes the VM's backup bitmaps from its disks (its gate held), after something changed
    /// the disks behind QEMU's back (a snapshot revert): the bitmaps no longer say what differs
    /// from the last backup, so the next backup must be full (and `auto` makes it so).
    pub(super) async fn forget_backup_bitmaps(&self, row: &VmRow) {
        if self.store.vm_backups(&row.id).map(|b| b.is_empty()).unwrap_or(true) {
            return;
        }
        let Ok(def) = definition_of(&row.definition) else {
            return;
        };
        let ids: Vec<String> = def
            .disks
            .iter()
            .enumerate()
            .filter(|(_, d)| !d.read_only && !d.shareable)
            .map(|(i, _)| format!("disk{i}"))
            .collect();
        let outcome = match self.vm_runtime.get(&row.id) {
            Some(live) => live.machine.prune_backup_bitmaps(&ids, None).await,
            None => {
                let mut nodes = Vec::new();
                for (id, d) in ids
                    .iter()
                    .zip(def.disks.iter().filter(|d| !d.read_only && !d.shareable))
                {
                    if let Ok(info) = self.storage.disk_info(&d.disk).await {
                        if info.format == viv_storage::DiskFormat::Qcow2 {
                            nodes.push((viv_vmm::machine::Machine::disk_format_node(id), info.path));
                        }
                    }
                }
                let socket = self
                    .backups_dir(&row.id)
                    .join(format!(".tmp-{}.qsd", super::random_id(8)));
                match StorageDaemon::start(&socket, &nodes).await {
                    Ok(daemon) => {
                        let names: Vec<String> = nodes.iter().map(|(n, _)| n.clone()).collect();
                        let removed = vmm_backup::remove_bitmaps_except(&daemon.qmp, &names, None).await;
                        let quit = daemon.quit().await;
                        removed.and(quit)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(err) = outcome {
            tracing::warn!(vm = %row.id, error = %err, "removing backup bitmaps after a revert; the next incremental backup may copy too little, take a full one");
        }
    }

    /// Deletes every backup of a VM being deleted (its gate held).
    pub(super) fn drop_vm_backups(&self, row: &VmRow) {
        let _ = self.store.delete_vm_backups(&row.id);
        let _ = std::fs::remove_dir_all(self.backups_dir(&row.id));
    }

    /// Removes backup files no row lists (a backup cut short by a crash) and the directories
    /// of VMs without backups. Run at start, before any backup can begin.
    pub(crate) fn sweep_vm_backups(&self) {
        let root = self.config.data_dir.join("backups");
        let Ok(known) = self.store.all_vm_backup_ids() else {
            return;
        };
        for vm_dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let vm_id = vm_dir.file_name().to_string_lossy().into_owned();
            let mut kept = 0;
            for file in std::fs::read_dir(vm_dir.path()).into_iter().flatten().flatten() {
                let name = file.file_name().to_string_lossy().into_owned();
                let listed = known
                    .iter()
                    .any(|(vm, id)| *vm == vm_id && name.starts_with(&format!("{id}-")) && name.ends_with(".qcow2"));
                if listed {
                    kept += 1;
                } else {
                    tracing::info!(file = %file.path().display(), "removing an unfinished backup file");
                    let _ = std::fs::remove_file(file.path());
                }
            }
            if kept == 0 {
                let _ = std::fs::remove_dir(vm_dir.path());
            }
        }
    }

    /// Starts restoring a backup as an operation: into new pool disks, or over the VM's own.
    pub fn start_vm_restore(
        self: &Arc<Self>,
        vm: &str,
        backup: &str,
        req: RestoreVmBackup,
    ) -> Result<Operation, ApiError> {
        let row = self.vm_row(vm)?;
        let target = self.backup_row(&row, backup)?;
        let count = stored_disks(&target)?.len();
        if let Some(names) = &req.new_disks {
            if names.len() != count {
                return Err(ApiError::BadRequest(format!(
                    "backup '{}' holds {count} disk(s); newDisks names {}",
                    target.id,
                    names.len()
                )));
            }
            for name in names {
                viv_storage::name::check(name)
                    .map_err(|e| ApiError::BadRequest(format!("invalid disk name {name:?}: {e}")))?;
            }
        } else if req.format.is_some() {
            return Err(ApiError::BadRequest(
                "format applies to new disks only (newDisks); restored in place, each disk keeps its format".into(),
            ));
        }
        self.check_operation_room()?;
        let (id, backup) = (row.id.clone(), target.id.clone());
        self.start_operation_with(OperationKind::Restore, &row.name, move |op| async move {
            let manager = op.manager().clone();
            let disks = manager.restore_vm_backup(&id, &backup, req, &op).await?;
            Ok(OperationResult::Disks(disks))
        })
    }

    async fn restore_vm_backup(
        self: &Arc<Self>,
        vm: &str,
        backup: &str,
        req: RestoreVmBackup,
        op: &OperationHandle,
    ) -> Result<Vec<String>, ApiError> {
        let (row, _held) = self.lock_vm(vm).await?;
        let target = self.backup_row(&row, backup)?;
        let disks = stored_disks(&target)?;
        let count = disks.len() as f64;
        let mut written: Vec<String> = Vec::new();
        match req.new_disks {
            Some(names) => {
                let format = match req.format.unwrap_or_default() {
                    viv_api::storage::DiskFormat::Qcow2 => viv_storage::DiskFormat::Qcow2,
                    viv_api::storage::DiskFormat::Raw => viv_storage::DiskFormat::Raw,
                };
                for (n, name) in names.iter().enumerate() {
                    let source = self.backup_file(&row.id, &target.id, n);
                    let mut progress = |f: f64| op.progress((n as f64 + f / 100.0) / count);
                    let made = self.storage.import_backup(name, &source, format, &mut progress).await;
                    if let Err(e) = made {
                        // Leave nothing half-restored: the disks made so far go again.
                        for done in &written {
                            let _ = self.storage.delete_disk(done, viv_storage::unused).await;
                        }
                        return Err(api(e.kind(), e));
                    }
                    written.push(name.clone());
                }
            }
            None => {
                let state = state_of(&row)?;
                if state.is_active() || self.vm_runtime.get(&row.id).is_some() {
                    return Err(ApiError::Conflict(format!(
                        "VM '{}' is {}: stop it before restoring over its disks, or restore into new disks (newDisks)",
                        row.name,
                        state.as_str()
                    )));
                }
                if !self.store.vm_snapshots(&row.id)?.is_empty() {
                    return Err(ApiError::Conflict(format!(
                        "VM '{}' has snapshots, which live inside its disks and would be lost: delete them first, or restore into new disks (newDisks)",
                        row.name
                    )));
                }
                let names: Vec<String> = disks.iter().map(|d| d.disk.clone()).collect();
                self.check_not_a_base(&row.name, &names)?;
                let devices = self.vm_devices()?;
                for (n, name) in names.iter().enumerate() {
                    let source = self.backup_file(&row.id, &target.id, n);
                    let mut progress = |f: f64| op.progress((n as f64 + f / 100.0) / count);
                    let in_use = |disk: &str| describe_vms(&devices.active_disk_users(disk));
                    self.storage
                        .restore_disk(name, &source, in_use, &mut progress)
                        .await
                        .map_err(|e| api(e.kind(), format!("VM '{}': {e}", row.name)))?;
                    written.push(name.clone());
                }
            }
        }
        tracing::info!(vm = %row.id, backup = %target.id, disks = ?written, "VM backup restored");
        Ok(written)
    }
}

/// The QMP a backup runs through.
enum QmpOf<'a> {
    Machine(&'a Arc<super::vm_runtime::LiveVm>),
    Daemon(&'a viv_vmm::qmp::Qmp),
}

/// Temporary (or not yet recorded) files, removed when dropped unless cleared.
struct TempFiles(Vec<PathBuf>);

impl Drop for TempFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn backup_file_name(backup: &str, n: usize) -> String {
    format!("{backup}-{n}.qcow2")
}

fn stored_disks(row: &VmBackupRow) -> Result<Vec<StoredDisk>, ApiError> {
    serde_json::from_str(&row.disks).map_err(|e| ApiError::Internal(format!("backup {}: {e}", row.id)))
}

fn backup_error(vm: &str, e: BackupError) -> ApiError {
    ApiError::Internal(format!("backup of VM '{vm}': {e}"))
}
