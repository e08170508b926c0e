//! E2B volumes: named directories under the data directory (`volumes/<id>`) that outlive
//! sandboxes, with a content API reached by each volume's bearer token.
//!
//! Invariants:
//! - a volume's directory exists exactly while its row does (created before the row, removed
//!   after it);
//! - names and ids from clients are only ever compared with rows: a directory is named by the
//!   id of a row this server created (letters, digits and `-`), never by client input;
//! - the content API reaches a volume only with its token, compared in constant time;
//! - a volume mounted by a sandbox that is not gone cannot be destroyed (409 naming them);
//! - a mount is a FUSE file system in the guest whose requests the agent relays over one
//!   exchange of the agent channel to a [`FuseSession`] here (one thread per mount); it lives
//!   as long as that exchange (the sandbox's VM and the agent session), so every sandbox
//!   mounting a volume reads and writes the same host directory.

use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use viv_api::volumes::{SandboxVolumeMount, Volume, VolumeAndToken};

use super::volume_fs::{FsError, VolPath, VolumeDir};
use super::volume_fuse::{FuseSession, IN_HEADER, MAX_WRITE};
use super::Manager;
use crate::error::ApiError;
use crate::store::{VolumeDeletion, VolumeRow};

/// Most volumes one sandbox mounts.
const MAX_MOUNTS: usize = 16;

/// Logs the end of a mount's relay when dropped.
struct EndLog(String, String);

impl Drop for EndLog {
    fn drop(&mut self) {
        tracing::info!(sandbox = %self.0, path = %self.1, "volume mount relay ended");
    }
}

/// A volume to mount, checked: its row and the mount point.
pub struct Mount {
    volume: VolumeRow,
    path: String,
}

/// Checks a volume name (see [`super::check_name`]).
pub fn check_name(name: &str) -> Result<(), ApiError> {
    super::check_name("volume", name)
}

/// A new volume id, shaped like a UUID as E2B's are.
fn new_id() -> String {
    super::random_uuid()
}

/// Equal byte strings, in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl From<FsError> for ApiError {
    fn from(err: FsError) -> Self {
        match err {
            FsError::BadPath(m) | FsError::Invalid(m) => ApiError::BadRequest(m),
            FsError::NotFound(_) => ApiError::NotFound(err.to_string()),
            FsError::Exists(_) => ApiError::Conflict(format!("{err}; pass force to replace it")),
            FsError::Io { .. } => ApiError::Internal(err.to_string()),
        }
    }
}

fn with_token(row: VolumeRow) -> VolumeAndToken {
    VolumeAndToken {
        volume_id: row.id,
        name: row.name,
        token: row.token,
    }
}

impl Manager {
    fn volumes_dir(&self) -> PathBuf {
        self.config.data_dir.join("volumes")
    }

    /// Creates an empty volume; 409 when the name is taken.
    pub fn create_volume(&self, name: &str) -> Result<VolumeAndToken, ApiError> {
        check_name(name)?;
        if self.store.volume_by_name(name)?.is_some() {
            return Err(ApiError::Conflict(format!("a volume named '{name}' already exists")));
        }
        let row = VolumeRow {
            id: new_id(),
            name: name.to_owned(),
            token: format!("vol_{}", hex::encode(rand::random::<[u8; 24]>())),
        };
        let dir = self.volumes_dir().join(&row.id);
        // Every guest user may write at the volume's root (the data directory keeps host users
        // out).
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            })
            .map_err(|e| ApiError::Internal(format!("creating the volume directory {}: {e}", dir.display())))?;
        match self.store.insert_volume(&row) {
            Ok(true) => Ok(with_token(row)),
            Ok(false) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(ApiError::Conflict(format!("a volume named '{name}' already exists")))
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e.into())
            }
        }
    }

    /// Every volume.
    pub fn list_volumes(&self) -> Result<Vec<Volume>, ApiError> {
        Ok(self
            .store
            .list_volumes()?
            .into_iter()
            .map(|row| Volume {
                volume_id: row.id,
                name: row.name,
            })
            .collect())
    }

    /// A volume with its token, by id.
    pub fn volume_info(&self, id: &str) -> Result<VolumeAndToken, ApiError> {
        self.store
            .volume(id)?
            .map(with_token)
            .ok_or_else(|| ApiError::NotFound(format!("volume '{id}' not found")))
    }

    /// Destroys a volume and its content; 409 while a sandbox that is not gone mounts it.
    pub fn destroy_volume(&self, id: &str) -> Result<(), ApiError> {
        match self.store.delete_volume(id)? {
            VolumeDeletion::Missing => Err(ApiError::NotFound(format!("volume '{id}' not found"))),
            VolumeDeletion::InUse(sandboxes) => Err(ApiError::Conflict(format!(
                "volume '{id}' is mounted by sandbox(es) {}; kill them first",
                sandboxes.join(", ")
            ))),
            VolumeDeletion::Deleted => {
                let dir = self.volumes_dir().join(id);
                std::fs::remove_dir_all(&dir)
                    .or_else(|e| {
                        if e.kind() == std::io::ErrorKind::NotFound {
                            Ok(())
                        } else {
                            Err(e)
                        }
                    })
                    .map_err(|e| ApiError::Internal(format!("removing {}: {e}", dir.display())))
            }
        }
    }

    /// Checks `volumeMounts` of a create: volumes that exist, absolute normalized mount points
    /// other than `/`, no mount point twice.
    pub fn check_mounts(&self, mounts: Option<&[SandboxVolumeMount]>) -> Result<Vec<Mount>, ApiError> {
        let mounts = mounts.unwrap_or_default();
        if mounts.len() > MAX_MOUNTS {
            return Err(ApiError::BadRequest(format!(
                "at most {MAX_MOUNTS} volume mounts per sandbox"
            )));
        }
        let mut checked: Vec<Mount> = Vec::new();
        for m in mounts {
            let normal = VolPath::parse(&m.path).map(|p| p.display()).ok();
            if !m.path.starts_with('/') || m.path == "/" || normal.as_deref() != Some(m.path.as_str()) {
                return Err(ApiError::BadRequest(format!(
                    "volumeMounts: '{}' is not an absolute, normalized mount point other than /",
                    m.path
                )));
            }
            if checked.iter().any(|c| c.path == m.path) {
                return Err(ApiError::BadRequest(format!(
                    "volumeMounts: '{}' is given twice",
                    m.path
                )));
            }
            let volume = self
                .store
                .volume_by_name(&m.name)?
                .ok_or_else(|| ApiError::BadRequest(format!("volumeMounts: no volume named '{}'", m.name)))?;
            checked.push(Mount {
                volume,
                path: m.path.clone(),
            });
        }
        Ok(checked)
    }

    /// Records and mounts `mounts` into the running sandbox `id`.
    pub async fn mount_volumes(&self, id: &str, mounts: &[Mount]) -> Result<(), ApiError> {
        if mounts.is_empty() {
            return Ok(());
        }
        let pairs: Vec<(String, String)> = mounts.iter().map(|m| (m.volume.id.clone(), m.path.clone())).collect();
        self.store.insert_sandbox_volumes(id, &pairs)?;
        let live = self.live(id)?;
        for m in mounts {
            let dir = VolumeDir::open(&self.volumes_dir().join(&m.volume.id))?;
            let session = FuseSession::new(dir.root())
                .map_err(|e| ApiError::Internal(format!("serving volume '{}': {e}", m.volume.name)))?;
            let failed =
                |e: String| ApiError::Sandbox(format!("mounting volume '{}' at {}: {e}", m.volume.name, m.path));
            let (to_guest, replies) = tokio::sync::mpsc::channel::<Bytes>(64);
            let body = axum::body::Body::from_stream(
                tokio_stream::wrappers::ReceiverStream::new(replies).map(Ok::<_, std::convert::Infallible>),
            );
            let query = serde_urlencoded::to_string([("path", &m.path)]).map_err(|e| failed(e.to_string()))?;
            let request = hyper::Request::post(format!("http://agent/volume/mount?{query}"))
                .body(body)
                .map_err(|e| failed(e.to_string()))?;
            let response = live.agent.send_ok(request).await.map_err(|e| failed(e.to_string()))?;
            let (requests, inbox) = std::sync::mpsc::channel::<Bytes>();
            std::thread::Builder::new()
                .name(format!("volume-{id}"))
                .spawn(move || {
                    let mut session = session;
                    while let Ok(msg) = inbox.recv() {
                        let opcode = msg.get(4..8).map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")));
                        let reply = session.handle(&msg);
                        tracing::debug!(?opcode, len = msg.len(), reply = ?reply.as_ref().map(|r| (r.len(), r.get(4..8).map(|e| i32::from_le_bytes(e.try_into().expect("4 bytes"))))), "fuse request");
                        if let Some(reply) = reply {
                            if to_guest.blocking_send(Bytes::from(reply)).is_err() {
                                return;
                            }
                        }
                    }
                })
                .map_err(|e| failed(e.to_string()))?;
            let mut output = response.into_body();
            let (sandbox, path) = (id.to_owned(), m.path.clone());
            tokio::spawn(async move {
                let _ended = EndLog(sandbox, path);
                let mut pending = BytesMut::new();
                while let Some(Ok(frame)) = output.frame().await {
                    let Ok(data) = frame.into_data() else { continue };
                    pending.extend_from_slice(&data);
                    while pending.len() >= 4 {
                        let len = u32::from_le_bytes(pending[..4].try_into().expect("4 bytes")) as usize;
                        // Not a FUSE request: the relay is broken; dropping it ends the mount.
                        if !(IN_HEADER..=MAX_WRITE as usize + 4096).contains(&len) {
                            return;
                        }
                        if pending.len() < len {
                            break;
                        }
                        if requests.send(pending.split_to(len).freeze()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        Ok(())
    }

    /// Mounts again the volumes of a sandbox that resumed (a restore ends the mounts' relays,
    /// and with them the mounts). A volume that cannot be mounted is logged, not fatal.
    pub async fn remount_volumes(&self, id: &str) {
        let mounts: Vec<Mount> = match self.store.sandbox_volumes(id) {
            Ok(rows) => rows
                .into_iter()
                .filter_map(|(name, path)| {
                    let volume = self.store.volume_by_name(&name).ok().flatten()?;
                    Some(Mount { volume, path })
                })
                .collect(),
            Err(err) => {
                tracing::warn!(sandbox = %id, error = %err, "reading the sandbox's volume mounts");
                return;
            }
        };
        if let Err(err) = self.mount_volumes(id, &mounts).await {
            tracing::warn!(sandbox = %id, error = %err, "mounting volumes again after a resume");
        }
    }

    /// The directory of the volume `id` if `token` is its content token: 401 without a token or
    /// with a wrong one, 404 for an unknown volume.
    pub fn volume_content(&self, id: &str, token: Option<&str>) -> Result<VolumeDir, ApiError> {
        let token = token.ok_or_else(|| {
            ApiError::Unauthorized("missing 'Authorization: Bearer <token>' (the volume's token)".into())
        })?;
        let row = self
            .store
            .volume(id)?
            .ok_or_else(|| ApiError::NotFound(format!("volume '{id}' not found")))?;
        if !same_secret(token.as_bytes(), row.token.as_bytes()) {
            return Err(ApiError::Unauthorized(format!("invalid token for volume '{id}'")));
        }
        Ok(VolumeDir::open(&self.volumes_dir().join(&row.id))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "data", "test-mount-1b4e28ba-2fa1-11d2-883f-0016d3cca427", "v_1.2"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", ".hidden", "a/b", "..", "a b", "é", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids_look_like_uuids_and_secrets_compare() {
        let id = new_id();
        assert_eq!(id.len(), 36);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit() || c == '-'));
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }
}
