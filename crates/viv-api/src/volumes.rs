//! Wire types of E2B's volume routes: the control plane (`/volumes`, API key) and the content
//! API (`/volumecontent/{volumeID}/...`, the volume's bearer token). Field names follow E2B's.

use serde::{Deserialize, Serialize};

/// `POST /volumes` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewVolume {
    /// Name, unique on the server.
    pub name: String,
}

/// A volume as listed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Volume {
    /// Id.
    #[serde(rename = "volumeID")]
    pub volume_id: String,
    /// Name.
    pub name: String,
}

/// A volume with the token its content API takes (`Authorization: Bearer <token>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeAndToken {
    /// Id.
    #[serde(rename = "volumeID")]
    pub volume_id: String,
    /// Name.
    pub name: String,
    /// Bearer token of the content API.
    pub token: String,
}

/// One entry of a volume, as the content API reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeEntryStat {
    /// Last path component (`""` for the root).
    pub name: String,
    /// `file`, `directory`, `symlink` or `unknown`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Absolute path inside the volume (`/a/b`).
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time, RFC 3339.
    pub atime: String,
    /// Modification time, RFC 3339.
    pub mtime: String,
    /// Status change time, RFC 3339.
    pub ctime: String,
    /// A symlink's target, as stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// `PATCH /volumecontent/{volumeID}/path` body: what to change (absent fields stay).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeMetadataUpdate {
    /// New owner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// New group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    /// New permission bits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// A volume mounted into a sandbox at create (`volumeMounts` of `POST /sandboxes`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxVolumeMount {
    /// The volume's name.
    pub name: String,
    /// Absolute mount point in the guest.
    pub path: String,
}
