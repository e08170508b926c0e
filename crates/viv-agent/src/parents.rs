//! Missing parent directories of an upload's target, made as envd makes them.
//!
//! envd (which runs as root) creates every missing directory on the way to an uploaded file and
//! gives it to the uploading user, so a user may upload to `/data/x.txt` although `/` is root's.
//! The agent first tries as the user (the usual case: inside the user's own tree); only when the
//! kernel refuses it does it create the missing directories as root, each one then owned by the
//! user. Existing directories and files are never changed: the file itself is still written as
//! the user, so the kernel's permission checks on existing files stand.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::users::User;

/// Makes `dir` and its missing ancestors; those that had to be made as root belong to `user`.
pub async fn ensure(user: &User, dir: &Path) -> io::Result<()> {
    let owned = dir.to_path_buf();
    let as_user = crate::files::as_user(user, move || fs::create_dir_all(&owned)).await;
    match as_user {
        Err(err) if err.kind() == io::ErrorKind::PermissionDenied => {
            let (dir, uid, gid) = (dir.to_path_buf(), user.uid, user.gid);
            tokio::task::spawn_blocking(move || make_owned(&dir, uid, gid))
                .await
                .map_err(io::Error::other)?
        }
        other => other,
    }
}

/// Creates the missing directories of `dir`, top down, each owned by `uid`:`gid`.
fn make_owned(dir: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let mut missing: Vec<PathBuf> = Vec::new();
    let mut current = Some(dir);
    while let Some(path) = current {
        match fs::symlink_metadata(path) {
            Ok(_) => break,
            Err(err) if err.kind() == io::ErrorKind::NotFound => missing.push(path.to_path_buf()),
            Err(err) => return Err(err),
        }
        current = path.parent();
    }
    for path in missing.iter().rev() {
        match fs::create_dir(path) {
            Ok(()) => std::os::unix::fs::lchown(path, Some(uid), Some(gid))?,
            Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn makes_only_the_missing_directories_and_gives_them_away() {
        let base = std::env::temp_dir().join(format!("viv-agent-parents-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let before = fs::metadata(&base).unwrap();
        let (uid, gid) = (before.uid(), before.gid());
        make_owned(&base.join("a/b/c"), uid, gid).unwrap();
        assert!(base.join("a/b/c").is_dir());
        // Already there: nothing to do, no error.
        make_owned(&base.join("a/b"), uid, gid).unwrap();
        // A file in the way is an error, not a directory made around it.
        fs::write(base.join("file"), "x").unwrap();
        assert!(make_owned(&base.join("file/sub"), uid, gid).is_err());
        fs::remove_dir_all(&base).unwrap();
    }
}
