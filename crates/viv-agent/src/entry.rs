//! Entry descriptions as envd gives them (`Stat`, `ListDir`, `Move`, watch events): a symlink is
//! described as itself with its fully resolved target and that target's type and permission
//! bits; permissions are formatted as Go's `FileMode` does; metadata comes from the file's
//! `user.e2b.*` extended attributes. Reading a description changes nothing.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use viv_proto::filesystem::{EntryInfo, FileType};

use crate::users;

/// Describes one path as envd does. A symlink is described as itself (size, permissions, times)
/// with `is_symlink`, the fully resolved absolute path of what it points to as its target (the
/// link's own path when that does not resolve), and the type and permission bits of that target
/// (unspecified and 0 for a dangling link).
pub fn entry_info(path: &Path) -> io::Result<EntryInfo> {
    let meta = fs::symlink_metadata(path)?;
    let is_symlink = meta.file_type().is_symlink();
    let resolved = is_symlink.then(|| fs::canonicalize(path).ok()).flatten();
    let symlink_target = is_symlink.then(|| resolved.as_deref().unwrap_or(path).to_string_lossy().into_owned());
    let target_meta = resolved.as_ref().and_then(|r| fs::metadata(r).ok());
    let kind_meta = if is_symlink { target_meta.as_ref() } else { Some(&meta) };
    let file_type = match kind_meta {
        Some(m) if m.is_dir() => FileType::Directory,
        Some(m) if m.is_file() => FileType::File,
        _ => FileType::Unspecified,
    };
    Ok(EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        file_type,
        path: path.to_string_lossy().into_owned(),
        size: meta.len() as i64,
        mode: kind_meta.map_or(0, |m| m.permissions().mode() & 0o777),
        permissions: permissions_string(meta.mode()),
        owner: users::user_name(meta.uid()),
        group: users::group_name(meta.gid()),
        modified_time: meta
            .modified()
            .ok()
            .map(|t| humantime::format_rfc3339_nanos(t).to_string()),
        is_symlink,
        symlink_target,
        metadata: crate::metadata::read(path),
    })
}

fn permissions_string(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        // envd formats with Go's FileMode, which marks links with `L`.
        libc::S_IFLNK => 'L',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '-',
    };
    let mut out = String::with_capacity(10);
    out.push(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_permissions_like_ls() {
        assert_eq!(permissions_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFREG | 0o640), "-rw-r-----");
        assert_eq!(permissions_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
    }
}
