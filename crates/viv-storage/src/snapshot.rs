//! Internal snapshots of a stopped VM's qcow2 disks, through `qemu-img snapshot` (a running VM's
//! are taken by its QEMU). Each disk holds its own snapshots, named by a tag.
//!
//! Invariants: only qcow2 disks hold snapshots (a raw disk is refused, naming the disk); a disk
//! in use by a running QEMU is never changed (its image lock makes `qemu-img` fail, reported as a
//! conflict); tags are checked like names, so none is mistaken for an option.

use std::ffi::OsString;

use crate::{name, qemu_img, DirPool, DiskFormat, ErrorKind};

/// What to do with a disk's snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAction {
    /// Take it (`qemu-img snapshot -c`).
    Create,
    /// Bring the disk back to it (`-a`).
    Apply,
    /// Delete it (`-d`).
    Delete,
}

/// Why a disk snapshot operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskSnapshotError {
    /// Bad disk name or tag.
    #[error(transparent)]
    Name(#[from] name::NameError),
    /// No such disk.
    #[error("disk '{0}' does not exist")]
    NotFound(String),
    /// The disk is raw.
    #[error("disk '{0}' is raw: snapshots need qcow2 disks (clone it to a qcow2 disk first)")]
    Raw(String),
    /// A running VM holds the disk.
    #[error("disk '{0}' is in use by a running VM")]
    InUse(String),
    /// `qemu-img` failed.
    #[error(transparent)]
    Tool(qemu_img::ToolError),
}

impl DiskSnapshotError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Name(_) => ErrorKind::BadRequest,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Raw(_) | Self::InUse(_) => ErrorKind::Conflict,
            Self::Tool(_) => ErrorKind::Internal,
        }
    }
}

impl DirPool {
    /// Takes, applies or deletes snapshot `tag` of disk `name`.
    pub async fn disk_snapshot(&self, name: &str, tag: &str, action: SnapshotAction) -> Result<(), DiskSnapshotError> {
        name::check(name)?;
        name::check(tag)?;
        let path = self.disk_path(name, DiskFormat::Qcow2);
        if !path.is_file() {
            return Err(if self.disk_path(name, DiskFormat::Raw).is_file() {
                DiskSnapshotError::Raw(name.into())
            } else {
                DiskSnapshotError::NotFound(name.into())
            });
        }
        let flag = match action {
            SnapshotAction::Create => "-c",
            SnapshotAction::Apply => "-a",
            SnapshotAction::Delete => "-d",
        };
        let args: Vec<OsString> = vec![
            "snapshot".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            flag.into(),
            tag.into(),
            path.into_os_string(),
        ];
        match qemu_img::run(&args).await {
            Ok(_) => Ok(()),
            Err(err) if err.is_lock_conflict() => Err(DiskSnapshotError::InUse(name.into())),
            Err(err) => Err(DiskSnapshotError::Tool(err)),
        }
    }

    /// The internal snapshots of qcow2 disk `name`: tag → bytes of memory and device state it
    /// holds (0 for a disk-only one). Read without taking the image's lock, so a disk in use by
    /// a running VM is listed too (snapshot metadata is written only by snapshot operations).
    pub async fn disk_snapshot_sizes(
        &self,
        name: &str,
    ) -> Result<std::collections::HashMap<String, u64>, DiskSnapshotError> {
        name::check(name)?;
        let path = self.disk_path(name, DiskFormat::Qcow2);
        if !path.is_file() {
            return Err(DiskSnapshotError::NotFound(name.into()));
        }
        let args: Vec<OsString> = vec![
            "info".into(),
            "-U".into(),
            "--output=json".into(),
            "-f".into(),
            "qcow2".into(),
            path.into_os_string(),
        ];
        let json = qemu_img::run(&args).await.map_err(DiskSnapshotError::Tool)?;
        let info: serde_json::Value = serde_json::from_slice(&json).unwrap_or_default();
        Ok(info["snapshots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| Some((s["name"].as_str()?.to_owned(), s["vm-state-size"].as_u64().unwrap_or(0))))
            .collect())
    }
}
