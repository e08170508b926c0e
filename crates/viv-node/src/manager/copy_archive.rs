//! `COPY` archives: the files a build step copies from its context, as a tar the agent unpacks
//! at the destination (Docker's destination rules), and the digest that keys the step's layer.
//!
//! Invariants: only paths inside the context are read (a source that leaves it is refused); the
//! digest covers names, modes and contents, so a changed file changes the key.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The files of a `COPY` step as a tar archive to unpack into `target` in the guest.
#[derive(Debug)]
pub(super) struct CopyArchive {
    pub(super) target: String,
    pub(super) tar: Vec<u8>,
    pub(super) digest: String,
}

/// Builds the archive of a `COPY` step: its target directory in the guest, the tar, and a digest
/// of names, types, modes and contents (not times, so a touched file hits the cache).
/// A source that is a symlink is followed when `follow` is set (as Docker does), else copied
/// as the link itself (sources are then paths without `..` that no symlink leads through).
pub(super) fn copy_archive(
    context: &Path,
    sources: &[String],
    dest: &str,
    follow: bool,
) -> Result<CopyArchive, String> {
    let root = context
        .canonicalize()
        .map_err(|e| format!("reading the build context: {e}"))?;
    let is_link = |source: &str| -> bool {
        !follow && std::fs::symlink_metadata(root.join(source)).is_ok_and(|m| m.file_type().is_symlink())
    };
    let single_file = |source: &str| -> bool {
        sources.len() == 1
            && !dest.ends_with('/')
            && (is_link(source) || root.join(source).canonicalize().is_ok_and(|p| p.is_file()))
    };
    let (target, rename) = if single_file(&sources[0]) {
        let dest_path = Path::new(dest);
        let parent = dest_path.parent().map(|p| p.to_string_lossy().into_owned());
        let name = dest_path.file_name().map(|n| n.to_string_lossy().into_owned());
        (parent.unwrap_or_else(|| "/".into()), name)
    } else {
        let trimmed = dest.trim_end_matches('/');
        (
            if trimmed.is_empty() {
                "/".into()
            } else {
                trimmed.to_owned()
            },
            None,
        )
    };
    let mut builder = tar::Builder::new(Vec::new());
    let mut digest = Sha256::new();
    for source in sources {
        let path = root.join(source);
        if is_link(source) {
            let name = match &rename {
                Some(name) => PathBuf::from(name),
                None => PathBuf::from(path.file_name().ok_or("a source has no file name")?),
            };
            add_entry(&mut builder, &mut digest, &path, &name)?;
            continue;
        }
        let real = path
            .canonicalize()
            .map_err(|_| format!("source '{source}' does not exist in the build context"))?;
        if !real.starts_with(&root) {
            return Err(format!("source '{source}' leads outside the build context"));
        }
        if real.is_dir() {
            add_tree(&mut builder, &mut digest, &real, Path::new(""))?;
        } else {
            let name = match &rename {
                Some(name) => PathBuf::from(name),
                None => PathBuf::from(real.file_name().ok_or("a source has no file name")?),
            };
            add_entry(&mut builder, &mut digest, &real, &name)?;
        }
    }
    let tar = builder.into_inner().map_err(|e| format!("packing the files: {e}"))?;
    digest.update(target.as_bytes());
    Ok(CopyArchive {
        target,
        tar,
        digest: hex::encode(digest.finalize()),
    })
}

/// Adds the contents of `dir` under `prefix`, in name order, not following symlinks.
fn add_tree(builder: &mut tar::Builder<Vec<u8>>, digest: &mut Sha256, dir: &Path, prefix: &Path) -> Result<(), String> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .flatten()
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = prefix.join(entry.file_name());
        add_entry(builder, digest, &entry.path(), &name)?;
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            add_tree(builder, digest, &entry.path(), &name)?;
        }
    }
    Ok(())
}

fn add_entry(builder: &mut tar::Builder<Vec<u8>>, digest: &mut Sha256, path: &Path, name: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let fail = |e: std::io::Error| format!("reading {}: {e}", name.display());
    let meta = std::fs::symlink_metadata(path).map_err(fail)?;
    let mut header = tar::Header::new_gnu();
    header.set_mode(meta.mode() & 0o7777);
    header.set_mtime(meta.mtime().max(0) as u64);
    header.set_uid(0);
    header.set_gid(0);
    digest.update(name.to_string_lossy().as_bytes());
    digest.update([0]);
    digest.update(meta.mode().to_le_bytes());
    if meta.file_type().is_symlink() {
        let target = std::fs::read_link(path).map_err(fail)?;
        digest.update(target.to_string_lossy().as_bytes());
        header.set_entry_type(tar::EntryType::Symlink);
        header.set_size(0);
        builder.append_link(&mut header, name, &target).map_err(fail)?;
    } else if meta.is_dir() {
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        builder.append_data(&mut header, name, std::io::empty()).map_err(fail)?;
    } else if meta.is_file() {
        let content = std::fs::read(path).map_err(fail)?;
        digest.update(Sha256::digest(&content));
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(content.len() as u64);
        builder
            .append_data(&mut header, name, content.as_slice())
            .map_err(fail)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::copy_archive;

    #[test]
    fn copy_archives_follow_docker_destination_rules() {
        let dir = std::env::temp_dir().join(format!("viv-copy-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("app/sub")).unwrap();
        std::fs::write(dir.join("app/a.py"), "print(1)").unwrap();
        std::fs::write(dir.join("app/sub/b.txt"), "b").unwrap();
        std::fs::write(dir.join("top.txt"), "t").unwrap();

        let file = copy_archive(&dir, &["top.txt".into()], "/etc/renamed.txt", true).unwrap();
        assert_eq!(file.target, "/etc");
        let names = |tar: &[u8]| -> Vec<String> {
            tar::Archive::new(tar)
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(&file.tar), ["renamed.txt"]);

        let tree = copy_archive(&dir, &["app".into()], "/srv/app", true).unwrap();
        assert_eq!(tree.target, "/srv/app");
        assert_eq!(names(&tree.tar), ["a.py", "sub", "sub/b.txt"]);

        let into = copy_archive(&dir, &["top.txt".into(), "app/a.py".into()], "/opt/", true).unwrap();
        assert_eq!(into.target, "/opt");
        assert_eq!(names(&into.tar), ["top.txt", "a.py"]);

        // Times do not change the digest; contents do.
        let again = copy_archive(&dir, &["app".into()], "/srv/app", true).unwrap();
        assert_eq!(again.digest, tree.digest);
        std::fs::write(dir.join("app/a.py"), "print(2)").unwrap();
        assert_ne!(
            copy_archive(&dir, &["app".into()], "/srv/app", true).unwrap().digest,
            tree.digest
        );

        assert!(copy_archive(&dir, &["missing".into()], "/x", true)
            .unwrap_err()
            .contains("does not exist"));
        std::os::unix::fs::symlink("/etc", dir.join("escape")).unwrap();
        assert!(copy_archive(&dir, &["escape/passwd".into()], "/x", true)
            .unwrap_err()
            .contains("outside"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
