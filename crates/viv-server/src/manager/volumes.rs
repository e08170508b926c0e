//! E2B volumes: named directories under the data directory (`volumes/<id>`) that outlive
//! sandboxes, with a content API reached by each volume's bearer token.
//!
//! Invariants:
//! - a volume's directory exists exactly while its row does (created before the row, removed
//!   after it);
//! - names and ids from clients are only ever compared with rows: a directory is named by the
//!   id of a row this server created (letters, digits and `-`), never by client input;
//! - the content API reaches a volume only with its token, compared in constant time;
//! - a volume mounted by a sandbox that is not gone cannot be destroyed (409 naming them).

use std::path::PathBuf;

use viv_api::volumes::{Volume, VolumeAndToken};

use super::volume_fs::{FsError, VolumeDir};
use super::Manager;
use crate::error::ApiError;
use crate::store::{VolumeDeletion, VolumeRow};

/// Longest volume name.
const MAX_NAME: usize = 128;

/// Checks a volume name: 1–128 of letters, digits, `-`, `_` and `.`, starting with a letter or
/// digit.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ApiError::BadRequest(format!(
            "invalid volume name {name:?}: use 1 to {MAX_NAME} letters, digits, '-', '_' and '.', starting with a letter or digit"
        )))
    }
}

/// A new volume id, shaped like a UUID as E2B's are.
fn new_id() -> String {
    let hex = hex::encode(rand::random::<[u8; 16]>());
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
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
        std::fs::create_dir_all(&dir)
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
