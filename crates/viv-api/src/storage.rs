//! Wire types of the storage pool (`/disks`, `/isos`) and of asynchronous operations
//! (`/operations`).
//!
//! Invariants: names are those of the pool (checked by the server, never a path); sizes are in
//! bytes; an [`Operation`]'s `progress` only grows, from 0 to 1, and `finishedAt` is set exactly
//! when its state is no longer `running`.

use serde::{Deserialize, Serialize};

/// A disk's format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// QEMU's copy-on-write format (thin; can be a linked clone).
    #[default]
    Qcow2,
    /// A plain image.
    Raw,
}

impl DiskFormat {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
        }
    }
}

/// A disk of the storage pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DiskInfo {
    /// Its name.
    pub name: String,
    /// Its format.
    pub format: DiskFormat,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_size: Option<u64>,
    /// The disk it is a linked clone of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<String>,
    /// Names of the VMs whose definition (or pending definition) attaches it.
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// `POST /disks`: an empty disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewDisk {
    /// Its name.
    pub name: String,
    /// Its format (qcow2 when absent).
    #[serde(default)]
    pub format: DiskFormat,
    /// Its virtual size in bytes (a multiple of 512).
    pub size: u64,
}

/// `POST /disks/{name}/resize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskResize {
    /// The new virtual size in bytes.
    pub size: u64,
    /// Allow shrinking, which loses the data past the new end.
    #[serde(default)]
    pub force: bool,
}

/// `POST /disks/{name}/clone`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskClone {
    /// The new disk's name.
    pub name: String,
    /// A linked clone (a thin qcow2 backed by the source, which then cannot change) instead of
    /// a full copy.
    #[serde(default)]
    pub linked: bool,
}

/// An ISO of the library.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IsoInfo {
    /// Its name.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its SHA-256, 64 hex digits.
    pub sha256: String,
    /// When it was added (its file's modification time), RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_at: Option<String>,
    /// Names of the VMs whose CD-ROM drives name it.
    #[serde(default)]
    pub used_by: Vec<String>,
}

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationKind {
    /// Linked or full clone of a disk.
    Clone,
    /// Conversion of an uploaded image into a disk.
    Import,
    /// Zeroing a disk.
    Wipe,
    /// A backup of a VM's disks (`target` is the VM).
    Backup,
    /// Restoring a VM backup into disks (`target` is the VM).
    Restore,
    /// Live migration of a VM to another server (its target is the VM's name).
    Migrate,
}

impl OperationKind {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Clone => "clone",
            Self::Import => "import",
            Self::Wipe => "wipe",
            Self::Backup => "backup",
            Self::Restore => "restore",
            Self::Migrate => "migrate",
        }
    }
}

/// Where an operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OperationState {
    /// Still working.
    Running,
    /// Done; `result` holds what it made.
    Succeeded,
    /// Gave up; `error` says why.
    Failed,
}

impl OperationState {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
        }
    }
}

/// A long-running piece of work (`202 Accepted` answers carry one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Its id (`op-...`).
    pub id: String,
    /// What it does.
    pub kind: OperationKind,
    /// The disk it makes or changes.
    pub target: String,
    /// Where it is.
    pub state: OperationState,
    /// How far, from 0 to 1.
    pub progress: f64,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The HTTP status the failure would have had as a direct answer (400, 404, 409, 500).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_code: Option<u16>,
    /// The disk it made or changed, once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<DiskInfo>,
    /// The backup it made (kind `backup`), once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<crate::backups::VmBackup>,
    /// The disks it wrote (kind `restore`), once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<String>>,
    /// A migration's figures, once it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<crate::vms::MigrationFigures>,
    /// When it began, RFC 3339.
    pub created_at: String,
    /// When it ended, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

impl Operation {
    /// Whether it has ended.
    pub fn is_done(&self) -> bool {
        self.state != OperationState::Running
    }
}
