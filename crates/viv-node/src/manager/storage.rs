//! The storage pool through the API: disks (create, inspect, upload, import, download, resize,
//! clone, wipe, delete) and ISOs (upload, list, delete) of [`Manager::storage`].
//!
//! Invariants:
//! - no user input becomes a path but a pool name, which `viv_storage` checks; an import's
//!   image arrives as a request body, never as a server path;
//! - a disk named by any VM definition (or pending definition) is not deleted, and an ISO named
//!   by any VM's CD-ROM drive is not deleted (409 naming the VM): the definitions are read under
//!   the pool's commit lock, the moment of the delete; a disk of an active VM or one backing a
//!   linked clone is not wiped;
//! - a body that fails (wrong checksum, broken off, refused image) leaves no file: bodies are
//!   streamed (never held in memory) into dot-named temporaries the pool removes when it opens,
//!   and which are removed when the request or operation ends;
//! - a body announcing more bytes than the pool's file system has free is refused at once (413).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::AsyncRead;
use viv_api::storage::{self as wire, DiskClone, NewDisk, Operation, OperationKind};
use viv_api::vms::{VmDefinition, VmState};
use viv_storage::ErrorKind;

use super::Manager;
use crate::error::ApiError;

/// A storage error as an API error.
/// A storage failure as the API reports it: its `kind()` picks the status.
pub(super) fn api(kind: ErrorKind, error: impl std::fmt::Display) -> ApiError {
    let message = error.to_string();
    match kind {
        ErrorKind::NotFound => ApiError::NotFound(message),
        ErrorKind::Conflict => ApiError::Conflict(message),
        ErrorKind::BadRequest => ApiError::BadRequest(message),
        ErrorKind::Internal => ApiError::Internal(message),
    }
}

/// `map_err` of any storage error (they all have `kind()`).
macro_rules! api {
    () => {
        |e| api(e.kind(), e)
    };
}

pub(super) fn format_of(format: wire::DiskFormat) -> viv_storage::DiskFormat {
    match format {
        wire::DiskFormat::Qcow2 => viv_storage::DiskFormat::Qcow2,
        wire::DiskFormat::Raw => viv_storage::DiskFormat::Raw,
    }
}

fn wire_format(format: viv_storage::DiskFormat) -> wire::DiskFormat {
    match format {
        viv_storage::DiskFormat::Qcow2 => wire::DiskFormat::Qcow2,
        viv_storage::DiskFormat::Raw => wire::DiskFormat::Raw,
    }
}

/// A `qemu-img` failure because the file system cannot hold a file that large (a raw disk
/// beyond ext4's 16 TiB): the request's fault, not the host's.
fn file_too_large(tool: &viv_storage::qemu_img::ToolError) -> Option<ApiError> {
    match tool {
        viv_storage::qemu_img::ToolError::Failed { stderr, .. } if stderr.contains("too large") => {
            Some(ApiError::BadRequest(format!(
                "the pool's file system cannot hold a disk file this large ({}); use qcow2 or a smaller size",
                stderr.trim()
            )))
        }
        _ => None,
    }
}

/// Checks a pool name (400 naming the rule).
fn check_pool_name(what: &str, name: &str) -> Result<(), ApiError> {
    viv_storage::name::check(name).map_err(|e| ApiError::BadRequest(format!("invalid {what} name {name:?}: {e}")))
}

/// The VMs' definitions: (VM name, state, the definition and the pending one).
pub(super) struct VmDevices {
    vms: Vec<(String, Option<VmState>, Vec<VmDefinition>)>,
}

impl VmDevices {
    /// VMs attaching disk `name`.
    pub(super) fn disk_users(&self, name: &str) -> Vec<String> {
        self.users(|d| d.disks.iter().any(|x| x.disk == name), false)
    }

    /// Active VMs attaching disk `name`.
    pub(super) fn active_disk_users(&self, name: &str) -> Vec<String> {
        self.users(|d| d.disks.iter().any(|x| x.disk == name), true)
    }

    /// VMs whose CD-ROM drives name ISO `name`.
    fn iso_users(&self, name: &str) -> Vec<String> {
        self.users(|d| d.cdroms.iter().any(|c| c.iso.as_deref() == Some(name)), false)
    }

    fn users(&self, uses: impl Fn(&VmDefinition) -> bool, active_only: bool) -> Vec<String> {
        self.vms
            .iter()
            .filter(|(_, state, _)| !active_only || state.is_none_or(|s| s.is_active()))
            .filter(|(_, _, defs)| defs.iter().any(&uses))
            .map(|(name, _, _)| name.clone())
            .collect()
    }
}

/// "VM 'a'" or "VMs 'a', 'b'".
pub(super) fn describe_vms(names: &[String]) -> Option<String> {
    match names {
        [] => None,
        [one] => Some(format!("VM '{one}'")),
        many => Some(format!(
            "VMs {}",
            many.iter().map(|n| format!("'{n}'")).collect::<Vec<_>>().join(", ")
        )),
    }
}

/// Bytes free for an unprivileged writer on the file system of `path`.
pub(super) fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: an all-zero statvfs is a valid value of this plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c_path` is NUL-terminated and lives across the call; `stat` is live and writable.
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Whether a write failed for want of space or quota.
fn is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded | std::io::ErrorKind::FileTooLarge
    )
}

/// The 413 of a body that did not fit (it was discarded).
fn pool_full(e: &std::io::Error) -> ApiError {
    ApiError::TooLarge(format!(
        "the storage pool has no room for this upload ({e}); it was discarded, free some space first"
    ))
}

/// A dot-named temporary file in the pool's disk directory, removed when dropped.
struct Incoming {
    path: PathBuf,
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Manager {
    /// What this node's VMs use of its pool (a pool is a node's: other nodes' VMs use theirs).
    pub(super) fn vm_devices(&self) -> Result<VmDevices, ApiError> {
        let mut vms = Vec::new();
        for row in self.store.local_vms()? {
            let mut defs = Vec::new();
            for json in std::iter::once(&row.definition).chain(row.pending_definition.as_ref()) {
                match serde_json::from_str::<VmDefinition>(json) {
                    Ok(def) => defs.push(def),
                    Err(e) => tracing::warn!(vm = %row.id, error = %e, "unreadable VM definition"),
                }
            }
            vms.push((row.name, row.state.parse().ok(), defs));
        }
        Ok(VmDevices { vms })
    }

    fn wire_disk(info: viv_storage::DiskInfo, devices: &VmDevices) -> wire::DiskInfo {
        wire::DiskInfo {
            used_by: devices.disk_users(&info.name),
            name: info.name,
            format: wire_format(info.format),
            virtual_size: info.virtual_size,
            actual_size: info.actual_size,
            backing: info.backing,
        }
    }

    /// A disk made or changed, for the answer: its users are best effort (the change is done).
    fn disk_result(&self, info: viv_storage::DiskInfo) -> Result<wire::DiskInfo, ApiError> {
        let devices = self.vm_devices().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "reading the VM definitions");
            VmDevices { vms: Vec::new() }
        });
        Ok(Self::wire_disk(info, &devices))
    }

    /// Refuses a body larger than the pool's free space.
    fn check_room(&self, announced: Option<u64>) -> Result<(), ApiError> {
        let (Some(len), Some(free)) = (announced, free_bytes(self.storage().path())) else {
            return Ok(());
        };
        if len > free {
            return Err(ApiError::TooLarge(format!(
                "the upload is {len} bytes but the storage pool has only {free} bytes free; free some space first"
            )));
        }
        Ok(())
    }

    fn disk_exists(&self, name: &str) -> Result<bool, ApiError> {
        let disks = self
            .storage()
            .list_disks()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        Ok(disks.iter().any(|d| d.name == name))
    }

    /// Every disk of the pool, by name.
    pub async fn list_disks(&self) -> Result<Vec<wire::DiskInfo>, ApiError> {
        let devices = self.vm_devices()?;
        let summaries = self
            .storage()
            .list_disks()
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let mut disks = Vec::with_capacity(summaries.len());
        for summary in summaries {
            match self.storage().disk_info(&summary.name).await {
                Ok(info) => disks.push(Self::wire_disk(info, &devices)),
                Err(viv_storage::DiskInfoError::NotFound(_)) => {}
                Err(e) => {
                    // Listed as the file is: one unreadable disk does not hide the others.
                    tracing::warn!(disk = %summary.name, error = %e, "disk unreadable");
                    disks.push(wire::DiskInfo {
                        used_by: devices.disk_users(&summary.name),
                        name: summary.name,
                        format: wire_format(summary.format),
                        virtual_size: summary.file_size,
                        actual_size: None,
                        backing: None,
                    });
                }
            }
        }
        Ok(disks)
    }

    /// One disk.
    pub async fn disk(&self, name: &str) -> Result<wire::DiskInfo, ApiError> {
        let info = self.storage().disk_info(name).await.map_err(api!())?;
        self.disk_result(info)
    }

    /// Creates an empty disk.
    pub async fn create_disk(&self, req: NewDisk) -> Result<wire::DiskInfo, ApiError> {
        let info = self
            .storage()
            .create_disk(&req.name, format_of(req.format), req.size)
            .await
            .map_err(|e| match &e {
                viv_storage::CreateDiskError::Tool(t) => file_too_large(t).unwrap_or_else(|| api(e.kind(), &e)),
                _ => api(e.kind(), e),
            })?;
        tracing::info!(disk = %req.name, size = req.size, "disk created");
        self.disk_result(info)
    }

    /// Deletes a disk no VM definition names and no clone is backed by.
    pub async fn delete_disk(&self, name: &str) -> Result<(), ApiError> {
        check_pool_name("disk", name)?;
        self.vm_devices()?;
        // Read under the pool's commit lock, so a definition stored meanwhile is seen.
        self.storage()
            .delete_disk(name, |disk| match self.vm_devices() {
                Ok(devices) => describe_vms(&devices.disk_users(disk)),
                Err(e) => Some(format!("a VM, perhaps (the VM definitions could not be read: {e})")),
            })
            .await
            .map_err(|e| match e {
                viv_storage::DeleteDiskError::InUse { name, user } => {
                    ApiError::Conflict(format!("disk '{name}' is attached to {user}; detach it first"))
                }
                other => api(other.kind(), other),
            })?;
        tracing::info!(disk = %name, "disk deleted");
        Ok(())
    }

    /// Changes a disk's virtual size; shrinking needs `force`. A disk a running VM attaches
    /// grows online through its QEMU (the guest sees the new size); it cannot shrink.
    pub async fn resize_disk(&self, name: &str, size: u64, force: bool) -> Result<wire::DiskInfo, ApiError> {
        if let Some((live, device, vm)) = self.running_vm_with_disk(name)? {
            let now = self
                .storage()
                .disk_info(name)
                .await
                .map_err(|e| api(e.kind(), e))?
                .virtual_size;
            if size < now {
                return Err(ApiError::Conflict(format!(
                    "disk '{name}' is attached to running VM '{vm}': stop the VM to shrink it (running disks only grow)"
                )));
            }
            if !size.is_multiple_of(512) {
                return Err(ApiError::BadRequest(format!(
                    "size {size} is not a multiple of 512 bytes"
                )));
            }
            if size > now {
                live.machine
                    .resize_disk(&device, size)
                    .await
                    .map_err(|e| ApiError::Conflict(format!("resizing disk '{name}' of running VM '{vm}': {e}")))?;
            }
            tracing::info!(disk = %name, size, vm = %vm, "disk grown online");
            let info = self.storage().disk_info(name).await.map_err(|e| api(e.kind(), e))?;
            return self.disk_result(info);
        }
        let info = self
            .storage()
            .resize_disk(name, size, force)
            .await
            .map_err(|e| match &e {
                viv_storage::ResizeError::Tool(t) => file_too_large(t).unwrap_or_else(|| api(e.kind(), &e)),
                _ => api(e.kind(), e),
            })?;
        tracing::info!(disk = %name, size, force, "disk resized");
        self.disk_result(info)
    }

    /// Starts cloning disk `source` (linked or full) as an operation.
    pub async fn clone_disk(self: &Arc<Self>, source: &str, req: DiskClone) -> Result<Operation, ApiError> {
        check_pool_name("disk", source)?;
        check_pool_name("disk", &req.name)?;
        if !self.disk_exists(source)? {
            return Err(ApiError::NotFound(format!(
                "no disk named '{source}' in the pool to clone"
            )));
        }
        if self.disk_exists(&req.name)? {
            return Err(ApiError::Conflict(format!(
                "a disk named '{}' already exists; choose another name or delete it first",
                req.name
            )));
        }
        let source = source.to_owned();
        let op = self.start_operation(OperationKind::Clone, &req.name.clone(), move |op| async move {
            let manager = op.manager().clone();
            let info = if req.linked {
                manager.storage().linked_clone(&source, &req.name).await
            } else {
                let mut progress = |percent: f64| op.progress(percent / 100.0);
                manager.storage().full_clone(&source, &req.name, &mut progress).await
            };
            manager.disk_result(info.map_err(api!())?)
        })?;
        Ok(op)
    }

    /// Starts zeroing a disk as an operation; refused (409) while an active VM uses it.
    pub async fn wipe_disk(self: &Arc<Self>, name: &str) -> Result<Operation, ApiError> {
        check_pool_name("disk", name)?;
        if !self.disk_exists(name)? {
            return Err(ApiError::NotFound(format!("no disk named '{name}' in the pool")));
        }
        if let Some(user) = describe_vms(&self.vm_devices()?.active_disk_users(name)) {
            return Err(ApiError::Conflict(format!(
                "disk '{name}' is in use by {user}; stop it first"
            )));
        }
        let children = self
            .storage()
            .disk_children(name)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Some(child) = children.first() {
            return Err(ApiError::Conflict(format!(
                "disk '{name}' is the backing file of disk '{child}'; wiping it would corrupt that clone, delete the clone first"
            )));
        }
        let name = name.to_owned();
        self.start_operation(OperationKind::Wipe, &name.clone(), move |op| async move {
            let manager = op.manager().clone();
            let devices = manager.vm_devices()?;
            let info = manager
                .storage()
                .wipe_disk(&name, |disk| describe_vms(&devices.active_disk_users(disk)))
                .await
                .map_err(api!())?;
            manager.disk_result(info)
        })
    }

    /// Stores the image arriving on `body` as disk `name` once its SHA-256 is `sha256`.
    pub async fn upload_disk(
        &self,
        name: &str,
        sha256: &str,
        announced: Option<u64>,
        body: &mut (impl AsyncRead + Unpin),
    ) -> Result<wire::DiskInfo, ApiError> {
        check_pool_name("disk", name)?;
        self.check_room(announced)?;
        let info = self
            .storage()
            .upload_disk(name, body, sha256)
            .await
            .map_err(|e| match e {
                viv_storage::UploadError::TooLarge(_) => ApiError::TooLarge(e.to_string()),
                viv_storage::UploadError::Io(io) if is_full(&io.source) => pool_full(&io.source),
                other => api(other.kind(), other),
            })?;
        tracing::info!(disk = %name, "disk uploaded");
        self.disk_result(info)
    }

    /// Receives an image in any format `qemu-img` reads (checking `sha256` when given), then
    /// converts it to disk `name` of `format` as an operation.
    pub async fn import_disk(
        self: &Arc<Self>,
        name: &str,
        format: wire::DiskFormat,
        sha256: Option<&str>,
        announced: Option<u64>,
        body: &mut (impl AsyncRead + Unpin),
    ) -> Result<Operation, ApiError> {
        use sha2::Digest as _;
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        check_pool_name("disk", name)?;
        let expected = sha256
            .map(|s| {
                let s = s.trim();
                let s = s.strip_prefix("sha256:").unwrap_or(s);
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map(|()| out).map_err(|_| {
                    ApiError::BadRequest(format!("the expected SHA-256 '{s}' is not 64 hexadecimal digits"))
                })
            })
            .transpose()?;
        if self.disk_exists(name)? {
            return Err(ApiError::Conflict(format!(
                "a disk named '{name}' already exists; choose another name or delete it first"
            )));
        }
        self.check_room(announced)?;
        self.check_operation_room()?;
        let incoming = Incoming {
            path: self
                .storage()
                .path()
                .join("disks")
                .join(format!(".import-{}-{name}", super::random_id(12))),
        };
        let io = |e: std::io::Error| {
            if is_full(&e) {
                pool_full(&e)
            } else {
                ApiError::Internal(format!("writing {}: {e}", incoming.path.display()))
            }
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&incoming.path)
            .await
            .map_err(io)?;
        let mut hasher = sha2::Sha256::new();
        let mut total = 0u64;
        let mut buffer = vec![0u8; 256 * 1024];
        loop {
            let n = body
                .read(&mut buffer)
                .await
                .map_err(|e| ApiError::BadRequest(format!("the upload broke off: {e}")))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            if total > viv_storage::size::MAX_DISK_SIZE {
                return Err(ApiError::TooLarge(format!(
                    "the image is larger than {} bytes, the largest disk allowed",
                    viv_storage::size::MAX_DISK_SIZE
                )));
            }
            hasher.update(&buffer[..n]);
            file.write_all(&buffer[..n]).await.map_err(io)?;
        }
        file.sync_all().await.map_err(io)?;
        drop(file);
        if total == 0 {
            return Err(ApiError::BadRequest("the image is empty".into()));
        }
        let actual: [u8; 32] = hasher.finalize().into();
        if let Some(expected) = expected {
            if actual != expected {
                return Err(ApiError::BadRequest(format!(
                    "the upload's SHA-256 is {}, not the expected {}; the upload was discarded, send it again",
                    hex::encode(actual),
                    hex::encode(expected)
                )));
            }
        }
        let name = name.to_owned();
        self.start_operation(OperationKind::Import, &name.clone(), move |op| async move {
            let manager = op.manager().clone();
            let mut progress = |percent: f64| op.progress(percent / 100.0);
            let info = manager
                .storage()
                .import_disk(&name, &incoming.path, format_of(format), &mut progress)
                .await
                .map_err(api!());
            drop(incoming);
            manager.disk_result(info?)
        })
    }

    /// Opens a disk for download.
    pub async fn download_disk(&self, name: &str) -> Result<viv_storage::Download, ApiError> {
        self.storage().download_disk(name).await.map_err(api!())
    }

    /// Disk `name` converted to `format` (`qcow2`, `raw` or `vmdk`) for download.
    pub async fn export_disk(&self, name: &str, format: &str) -> Result<viv_storage::Export, ApiError> {
        let format = viv_storage::ExportFormat::parse(format)
            .ok_or_else(|| ApiError::BadRequest(format!("format must be qcow2, raw or vmdk, not {format:?}")))?;
        self.storage().export_disk(name, format).await.map_err(api!())
    }

    fn wire_iso(info: viv_storage::IsoInfo, devices: &VmDevices) -> wire::IsoInfo {
        let added_at = std::fs::metadata(&info.path)
            .and_then(|m| m.modified())
            .ok()
            .map(|t| humantime::format_rfc3339_seconds(t).to_string());
        wire::IsoInfo {
            used_by: devices.iso_users(&info.name),
            name: info.name,
            size: info.size,
            sha256: info.sha256,
            added_at,
        }
    }

    /// The ISO library, by name.
    pub async fn list_isos(&self) -> Result<Vec<wire::IsoInfo>, ApiError> {
        let devices = self.vm_devices()?;
        let isos = self.storage().list_isos().await.map_err(api!())?;
        Ok(isos.into_iter().map(|i| Self::wire_iso(i, &devices)).collect())
    }

    /// One ISO.
    pub async fn iso(&self, name: &str) -> Result<wire::IsoInfo, ApiError> {
        let info = self.storage().iso(name).await.map_err(api!())?;
        Ok(Self::wire_iso(info, &self.vm_devices()?))
    }

    /// Adds the ISO arriving on `body`, checking `sha256` when given.
    pub async fn add_iso(
        &self,
        name: &str,
        sha256: Option<&str>,
        announced: Option<u64>,
        body: &mut (impl AsyncRead + Unpin),
    ) -> Result<wire::IsoInfo, ApiError> {
        check_pool_name("ISO", name)?;
        self.check_room(announced)?;
        let info = self.storage().add_iso(name, body, sha256).await.map_err(|e| match e {
            viv_storage::IsoAddError::TooLarge(_) => ApiError::TooLarge(e.to_string()),
            viv_storage::IsoAddError::Io(io) if is_full(&io.source) => pool_full(&io.source),
            other => api(other.kind(), other),
        })?;
        tracing::info!(iso = %name, "ISO added");
        Ok(Self::wire_iso(info, &self.vm_devices()?))
    }

    /// Deletes an ISO no VM's CD-ROM drive names.
    pub async fn delete_iso(&self, name: &str) -> Result<(), ApiError> {
        check_pool_name("ISO", name)?;
        self.vm_devices()?;
        self.storage()
            .delete_iso(name, |iso| match self.vm_devices() {
                Ok(devices) => describe_vms(&devices.iso_users(iso)),
                Err(e) => Some(format!("a VM, perhaps (the VM definitions could not be read: {e})")),
            })
            .await
            .map_err(|e| match e {
                viv_storage::IsoError::InUse { name, user } => ApiError::Conflict(format!(
                    "ISO '{name}' is in the CD-ROM drive of {user}; eject it (remove it from the definition) first"
                )),
                other => api(other.kind(), other),
            })?;
        tracing::info!(iso = %name, "ISO deleted");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_lists_read_as_words() {
        assert_eq!(describe_vms(&[]), None);
        assert_eq!(describe_vms(&["a".into()]).unwrap(), "VM 'a'");
        assert_eq!(describe_vms(&["a".into(), "b".into()]).unwrap(), "VMs 'a', 'b'");
    }

    #[test]
    fn free_space_is_read() {
        assert!(free_bytes(Path::new("/")).is_some());
        assert!(free_bytes(Path::new("/no/such/dir")).is_none());
    }
}
