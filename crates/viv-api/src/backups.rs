//! Wire types of VM backups: `POST /vms/{id}/backups` (an operation), `GET /vms/{id}/backups`,
//! `DELETE /vms/{id}/backups/{backup}` and `POST /vms/{id}/backups/{backup}/restore`.
//!
//! Invariant: a backup is listed only once all its disk files are complete; an incremental
//! backup's `parentId` is the backup its files are backed by.

use serde::{Deserialize, Serialize};

use crate::storage::DiskFormat;

/// What a backup copies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackupKind {
    /// Incremental when the VM's last backup can be followed, else full.
    #[default]
    Auto,
    /// Every block of every disk.
    Full,
    /// The blocks written since the VM's last backup.
    Incremental,
}

impl BackupKind {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Full => "full",
            Self::Incremental => "incremental",
        }
    }
}

/// `POST /vms/{id}/backups`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewVmBackup {
    /// Full, incremental or (the default) whichever applies.
    #[serde(default)]
    pub kind: BackupKind,
}

/// One disk's file in a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackupDiskInfo {
    /// The pool disk it copies.
    pub disk: String,
    /// The disk's virtual size, bytes.
    pub virtual_size: u64,
    /// The backup file's size on the host, bytes (an incremental one holds only changes).
    pub file_size: u64,
}

/// A backup of a VM's writable disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmBackup {
    /// Id (`bk-...`).
    pub id: String,
    /// The VM's id.
    pub vm_id: String,
    /// `full` or `incremental`.
    pub kind: BackupKind,
    /// For an incremental backup, the backup it adds to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The disks copied, in the VM's order.
    pub disks: Vec<BackupDiskInfo>,
    /// Whether the VM was running when the backup was taken.
    pub live: bool,
    /// When it was taken, RFC 3339.
    pub created_at: String,
}

/// `POST /vms/{id}/backups/{backup}/restore`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RestoreVmBackup {
    /// Restore into new pool disks with these names, one per disk of the backup, in order.
    /// Absent: the VM's own disks are overwritten (the VM must be stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_disks: Option<Vec<String>>,
    /// The new disks' format (default qcow2); in place, each disk keeps its format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
}
