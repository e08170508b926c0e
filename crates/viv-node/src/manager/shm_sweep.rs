//! Guest memory in tmpfs (`/dev/shm/vivarium-KEY`, one directory per data directory) outlives
//! its server on purpose: sandboxes and template snapshots restore from it after a restart. A
//! data directory that was deleted leaves its memory behind, though, and tmpfs is RAM. So each
//! memory directory records the data directory it belongs to (`owner`), and a starting server
//! removes the memory directories whose data directory is gone.
//!
//! Invariants: a directory is removed only when its `owner` names an absolute path that does
//! not exist (directories without a readable `owner`, such as older servers', are left alone);
//! only `vivarium-*` directories of the root are looked at.

use std::path::{Path, PathBuf};

/// The file naming a memory directory's data directory (kept by the start's cleanup).
pub(super) const OWNER: &str = "owner";

/// Records in `memory_dir` that it belongs to `data_dir`.
pub(super) fn record_owner(memory_dir: &Path, data_dir: &Path) -> std::io::Result<()> {
    let staged = memory_dir.join(".owner.tmp");
    std::fs::write(&staged, data_dir.as_os_str().as_encoded_bytes())?;
    std::fs::rename(&staged, memory_dir.join(OWNER))
}

/// Removes the `vivarium-*` directories of `root` whose data directory is gone; returns them.
pub(super) fn remove_orphaned(root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let dir = entry.path();
        let ours =
            entry.file_name().to_string_lossy().starts_with("vivarium-") && entry.file_type().is_ok_and(|t| t.is_dir());
        if !ours {
            continue;
        }
        let Ok(owner) = std::fs::read_to_string(dir.join(OWNER)) else {
            continue;
        };
        let owner = Path::new(owner.trim_end_matches('\n'));
        if owner.is_absolute() && !owner.exists() && std::fs::remove_dir_all(&dir).is_ok() {
            removed.push(dir);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_of_deleted_data_directories_is_removed_and_nothing_else() {
        let root = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        let mk = |name: &str| {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("t.mem"), b"memory").unwrap();
            dir
        };
        let live = mk("vivarium-live");
        record_owner(&live, data.path()).unwrap();
        let gone = mk("vivarium-gone");
        record_owner(&gone, Path::new("/nonexistent/viv-data-dir")).unwrap();
        let unknown = mk("vivarium-old");
        let other = mk("PostgreSQL.1");
        record_owner(&other, Path::new("/nonexistent/x")).unwrap();
        let relative = mk("vivarium-relative");
        record_owner(&relative, Path::new("relative/dir")).unwrap();

        assert_eq!(remove_orphaned(root.path()), vec![gone.clone()]);
        assert!(!gone.exists());
        for kept in [&live, &unknown, &other, &relative] {
            assert!(kept.join("t.mem").is_file(), "{}", kept.display());
        }
        assert_eq!(
            std::fs::read_to_string(live.join(OWNER)).unwrap(),
            data.path().to_string_lossy()
        );
        assert!(remove_orphaned(root.path()).is_empty());
    }
}
