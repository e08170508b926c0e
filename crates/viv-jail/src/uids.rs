//! The host-wide pool of uids jailed processes run as.
//!
//! Every servers on a host draws from one range, so two VMs never share a uid (which would let a
//! broken-into VMM open or signal the other's files and process). An allocation is a record
//! file `<dir>/<uid>` whose content names its owner (`<server key> <vm id>`), created under an
//! exclusive lock of `<dir>/.lock`. Records live on `/run` (a tmpfs): a reboot frees them all.
//!
//! Invariants: a uid is handed out only when it has no record and no process runs as it; a
//! record is removed only by its owner ([`UidPool::release`]) or when its owning VM is gone
//! ([`UidPool::remove_stale`]: no process runs as the uid), so a VM left running by a stopped
//! server keeps its uid.

use std::collections::BTreeSet;
use std::os::fd::AsRawFd as _;
use std::path::PathBuf;

use crate::{io_error, JailError};

/// Where allocations are recorded.
pub const UID_DIR: &str = "/run/vivarium/jail/uids";

/// The default range: above systemd-nspawn's (which ends at 0x6FFEFFFF) and below 2^31.
pub const DEFAULT_FIRST_UID: u32 = 0x7000_0000;
/// The default number of uids.
pub const DEFAULT_UID_COUNT: u32 = 65_536;

/// A range of uids and its records.
#[derive(Debug, Clone)]
pub struct UidPool {
    dir: PathBuf,
    first: u32,
    count: u32,
}

/// Uids some process runs as (real, effective, saved or file-system uid).
fn uids_in_use() -> BTreeSet<u32> {
    let mut used = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("Uid:")) {
            used.extend(line[4..].split_whitespace().filter_map(|u| u.parse::<u32>().ok()));
        }
    }
    used
}

impl UidPool {
    /// The pool of `count` uids from `first`, recorded in [`UID_DIR`].
    pub fn new(first: u32, count: u32) -> Result<Self, JailError> {
        Self::with_dir(UID_DIR, first, count)
    }

    /// The pool recorded in `dir` (tests use their own).
    pub fn with_dir(dir: impl Into<PathBuf>, first: u32, count: u32) -> Result<Self, JailError> {
        if first == 0 || count == 0 || first.checked_add(count).is_none_or(|end| end > u32::MAX - 1) {
            return Err(JailError::Config(format!(
                "jail uid range {first}+{count} is invalid: it must be non-empty, above 0 and below 4294967295"
            )));
        }
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(io_error(format!("creating {}", dir.display())))?;
        Ok(Self { dir, first, count })
    }

    /// The first uid and the number of uids.
    pub fn range(&self) -> (u32, u32) {
        (self.first, self.count)
    }

    /// Runs `f` under the pool's exclusive lock.
    fn locked<T>(&self, f: impl FnOnce() -> Result<T, JailError>) -> Result<T, JailError> {
        let path = self.dir.join(".lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error(format!("opening {}", path.display())))?;
        // SAFETY: flock on a descriptor `lock` owns, with plain flags; released when it closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io_error(format!("locking {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        f()
    }

    /// Takes a free uid for `owner` (a short description: server key and VM id).
    pub fn allocate(&self, owner: &str) -> Result<u32, JailError> {
        self.locked(|| {
            let recorded = self.recorded_uids();
            let running = uids_in_use();
            for uid in self.first..self.first + self.count {
                if recorded.contains(&uid) || running.contains(&uid) {
                    continue;
                }
                let path = self.dir.join(uid.to_string());
                match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                    Ok(mut file) => {
                        use std::io::Write as _;
                        file.write_all(owner.as_bytes())
                            .map_err(io_error(format!("writing {}", path.display())))?;
                        return Ok(uid);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(io_error(format!("creating {}", path.display()))(e)),
                }
            }
            Err(JailError::UidsExhausted(self.count))
        })
    }

    /// Frees `uid` (its VM is gone).
    pub fn release(&self, uid: u32) {
        let _ = std::fs::remove_file(self.dir.join(uid.to_string()));
    }

    /// The owner recorded for `uid`.
    pub fn owner(&self, uid: u32) -> Option<String> {
        std::fs::read_to_string(self.dir.join(uid.to_string())).ok()
    }

    fn recorded_uids(&self) -> BTreeSet<u32> {
        std::fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Every allocation: `(uid, owner)`.
    pub fn records(&self) -> Vec<(u32, String)> {
        self.recorded_uids()
            .into_iter()
            .filter_map(|uid| Some((uid, self.owner(uid)?)))
            .collect()
    }

    /// Removes records whose uid no process runs as any more, except those `keep` holds on to
    /// (given the uid, the owner and the record's age: a VM being started has a young record and
    /// no process yet). Returns the uids freed.
    pub fn remove_stale(&self, keep: impl Fn(u32, &str, std::time::Duration) -> bool) -> Result<Vec<u32>, JailError> {
        self.locked(|| {
            let running = uids_in_use();
            let mut freed = Vec::new();
            for (uid, owner) in self.records() {
                let age = std::fs::metadata(self.dir.join(uid.to_string()))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .unwrap_or_default();
                if !running.contains(&uid) && !keep(uid, &owner, age) {
                    self.release(uid);
                    freed.push(uid);
                }
            }
            Ok(freed)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uids_are_unique_recorded_and_freed() {
        let dir = tempfile::tempdir().unwrap();
        let pool = UidPool::with_dir(dir.path(), 3_000_000_000, 3).unwrap();
        let a = pool.allocate("k1 a").unwrap();
        let b = pool.allocate("k1 b").unwrap();
        let c = pool.allocate("k2 c").unwrap();
        assert_eq!([a, b, c], [3_000_000_000, 3_000_000_001, 3_000_000_002]);
        assert!(matches!(pool.allocate("k1 d"), Err(JailError::UidsExhausted(3))));
        assert_eq!(pool.owner(b).as_deref(), Some("k1 b"));
        pool.release(b);
        assert_eq!(pool.allocate("k1 e").unwrap(), b);
        // No process runs as these uids: every record but the kept one is stale.
        let freed = pool.remove_stale(|_, owner, _| owner == "k2 c").unwrap();
        assert_eq!(freed, vec![a, b]);
        assert_eq!(pool.records(), vec![(c, "k2 c".to_owned())]);
    }

    #[test]
    fn a_uid_some_process_runs_as_is_never_handed_out() {
        let dir = tempfile::tempdir().unwrap();
        // A uid some process of this host runs as, with a free one after it.
        let running = uids_in_use();
        let Some(&busy) = running.iter().find(|u| **u != 0 && !running.contains(&(**u + 1))) else {
            eprintln!("skipped: every process runs as root");
            return;
        };
        let pool = UidPool::with_dir(dir.path(), busy, 2).unwrap();
        assert_eq!(pool.allocate("k a").unwrap(), busy + 1);
    }

    #[test]
    fn bad_ranges_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(UidPool::with_dir(dir.path(), 0, 10).is_err());
        assert!(UidPool::with_dir(dir.path(), 10, 0).is_err());
        assert!(UidPool::with_dir(dir.path(), u32::MAX - 5, 10).is_err());
    }
}
