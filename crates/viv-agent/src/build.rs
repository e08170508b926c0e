//! Host-only routes used while a template is built: unpacking the files of a `COPY` step, and
//! flushing the file systems before a layer is frozen.
//!
//! The host's API never forwards `/build/*` from users (like `/init`), so only the template
//! builder reaches it.

use std::io;
use std::path::{Component, Path, PathBuf};

use axum::body::Bytes;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use crate::server::json_error;
use crate::users;

#[derive(Debug, Deserialize)]
pub struct CopyQuery {
    /// Absolute directory the archive is unpacked into (created when missing).
    path: String,
    /// `user[:group]` that should own what is unpacked; root when absent.
    owner: Option<String>,
}

/// `POST /build/copy?path=DIR[&owner=USER[:GROUP]]` with a tar archive as the body.
pub async fn copy(Query(q): Query<CopyQuery>, body: Bytes) -> Response {
    let dest = PathBuf::from(&q.path);
    if !dest.is_absolute() || dest.components().any(|c| c == Component::ParentDir) {
        return json_error(StatusCode::BAD_REQUEST, format!("'{}' is not an absolute path", q.path));
    }
    let owner = match q.owner.as_deref().map(resolve_owner).transpose() {
        Ok(owner) => owner,
        Err(message) => return json_error(StatusCode::BAD_REQUEST, message),
    };
    let result = tokio::task::spawn_blocking(move || unpack(&body, &dest, owner)).await;
    match result {
        Ok(Ok(count)) => axum::Json(serde_json::json!({ "entries": count })).into_response(),
        Ok(Err(err)) => json_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("unpacking into {}: {err}", q.path),
        ),
        Err(err) => json_error(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()),
    }
}

/// `POST /build/sync`: writes every dirty page and inode to the disks.
pub async fn sync() -> Response {
    // SAFETY: sync takes no arguments and cannot fail.
    let _ = tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await;
    axum::Json(serde_json::json!({})).into_response()
}

fn resolve_owner(spec: &str) -> Result<(u32, u32), String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let (uid, primary_gid) = match user.parse::<u32>() {
        Ok(uid) => (uid, uid),
        Err(_) => {
            let found = users::lookup(user).ok_or_else(|| format!("COPY --chown: user '{user}' does not exist"))?;
            (found.uid, found.gid)
        }
    };
    let gid = match group {
        Some(g) => users::group_id(g).ok_or_else(|| format!("COPY --chown: group '{g}' does not exist"))?,
        None => primary_gid,
    };
    Ok((uid, gid))
}

/// Unpacks `archive` into `dest` (entries may not leave it) and hands every entry to `owner`.
fn unpack(archive: &[u8], dest: &Path, owner: Option<(u32, u32)>) -> io::Result<usize> {
    std::fs::create_dir_all(dest)?;
    let mut reader = tar::Archive::new(archive);
    reader.set_preserve_permissions(true);
    reader.set_overwrite(true);
    let mut count = 0;
    for entry in reader.entries()? {
        let mut entry = entry?;
        let relative = entry.path()?.into_owned();
        if !entry.unpack_in(dest)? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "archive entry {} would land outside {}",
                    relative.display(),
                    dest.display()
                ),
            ));
        }
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::lchown(dest.join(&relative), Some(uid), Some(gid))?;
        }
        count += 1;
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(dest, Some(uid), Some(gid))?;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::unpack;

    #[test]
    fn unpacks_files_and_directories_with_modes() {
        let dir = tempdir();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(5);
        header.set_mode(0o755);
        header.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut header, "bin/tool", &b"hello"[..]).unwrap();
        let archive = builder.into_inner().unwrap();
        let dest = dir.join("a/b");
        assert_eq!(unpack(&archive, &dest, None).unwrap(), 1);
        let tool = dest.join("bin/tool");
        assert_eq!(std::fs::read(&tool).unwrap(), b"hello");
        use std::os::unix::fs::PermissionsExt as _;
        assert_eq!(std::fs::metadata(&tool).unwrap().permissions().mode() & 0o777, 0o755);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("viv-agent-build-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
