//! Whole states restored over the memory file their VM mapped (their *base*), loading only the
//! pages that differ from it; and the index of a base's zero pages that lets a restore skip
//! most of the base without reading it.
//!
//! Invariants:
//! - a base file is immutable once a VM maps it (a template's memory file is written only by
//!   the VM that built the template, before any restore): an index built once stays true for
//!   as long as the file at its path has the same device, inode and length. Holes that a
//!   private mapping's read fault fills in on tmpfs read as zeros before and after;
//! - a composed stream is exact whatever the base holds: a whole state has a record for every
//!   page, and only records equal to the base's page are left out.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{for_each_page_with_data, io, write_changed, BasePages, DiffError, DiffStats, Mapping, BASE_BLOCK};
use crate::migstream::{self, PAGE_SIZE};

/// What restores over a base need to know of it once: which file it is and which of its pages
/// are zero (holes or pages of zero bytes; a `base` template's 512 MiB file has ~400 MiB of
/// them).
pub struct BaseIndex {
    path: PathBuf,
    /// Device and inode.
    identity: (u64, u64),
    len: u64,
    /// Bit `i` is set when page `i` is zero.
    zero: Vec<u64>,
    zero_pages: usize,
}

impl std::fmt::Debug for BaseIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaseIndex")
            .field("path", &self.path)
            .field("len", &self.len)
            .field("zero_pages", &self.zero_pages)
            .finish()
    }
}

impl BaseIndex {
    /// Reads every page of `path` with data once (holes are skipped without reading them).
    pub fn build(path: &Path) -> Result<Self, DiffError> {
        use std::os::unix::fs::MetadataExt as _;
        let file = File::open(path).map_err(io(path))?;
        let meta = file.metadata().map_err(io(path))?;
        let pages = meta.len().div_ceil(PAGE_SIZE as u64) as usize;
        let mut zero = vec![u64::MAX; pages.div_ceil(64)];
        let mut zero_pages = pages;
        for_each_page_with_data(path, &file, meta.len(), |offset, _| {
            let page = offset as usize / PAGE_SIZE;
            zero[page / 64] &= !(1 << (page % 64));
            zero_pages -= 1;
            Ok(())
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            identity: (meta.dev(), meta.ino()),
            len: meta.len(),
            zero,
            zero_pages,
        })
    }

    /// The file it describes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its pages that are zero.
    pub fn zero_pages(&self) -> usize {
        self.zero_pages
    }

    /// Whether it still describes the file `meta` is of (the same device, inode and length).
    pub fn describes(&self, meta: &std::fs::Metadata) -> bool {
        use std::os::unix::fs::MetadataExt as _;
        (meta.dev(), meta.ino(), meta.len()) == (self.identity.0, self.identity.1, self.len)
    }

    /// Whether the page at `offset` is known to be zero.
    pub(super) fn is_zero(&self, offset: u64) -> bool {
        let page = (offset / PAGE_SIZE as u64) as usize;
        self.zero
            .get(page / 64)
            .is_some_and(|bits| bits & (1 << (page % 64)) != 0)
    }
}

/// A node's whole state restored onto the memory file its VM mapped (its *base*): the VM maps
/// the base privately and loads only the records of the state that differ from it, so a
/// restore writes (and the host allocates) only the pages the guest changed since it started
/// from that file, instead of every page of the state.
///
/// Invariant: the pages are compared with the base file this value opened; the caller checks
/// that the restoring QEMU maps that same file (see [`OverBase::base_identity`]) before
/// composing, since a path can name a newer file (a template rebuilt after a reboot).
pub struct OverBase {
    state_path: PathBuf,
    state: Mapping,
    base: Mapping,
    index: Arc<BaseIndex>,
}

impl std::fmt::Debug for OverBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OverBase")
            .field("state", &self.state_path)
            .field("base", &self.index.path)
            .finish()
    }
}

impl OverBase {
    /// Maps the whole state `state` (already opened, the file at `state_path`) and the base
    /// `index` describes, which must be exactly as long as the state's guest memory block and
    /// still the file the index was built of. Reads only the state's setup: its records are
    /// checked as [`OverBase::compose`] writes them.
    pub fn open(state_path: &Path, state: &File, index: Arc<BaseIndex>) -> Result<Self, DiffError> {
        let base_path = index.path.clone();
        let state_map = Mapping::whole(state_path, state)?;
        let base_file = File::open(&base_path).map_err(io(&base_path))?;
        let meta = base_file.metadata().map_err(io(&base_path))?;
        if !index.describes(&meta) {
            return Err(DiffError::Mismatch {
                path: base_path,
                what: "it changed since its pages were indexed".into(),
            });
        }
        // The index knows the holes: pages it does not call zero are read through the mapping.
        let base_map = Mapping::whole(&base_path, &base_file)?;
        let blocks = migstream::blocks(state_map.bytes()).map_err(|source| DiffError::Stream {
            path: state_path.to_path_buf(),
            source,
        })?;
        let block = blocks
            .iter()
            .find(|b| b.name == BASE_BLOCK)
            .ok_or_else(|| DiffError::Mismatch {
                path: state_path.to_path_buf(),
                what: format!("no RAM block '{BASE_BLOCK}'"),
            })?;
        if meta.len() != block.length {
            return Err(DiffError::Mismatch {
                path: base_path,
                what: format!(
                    "the base holds {} bytes but the guest's memory is {}",
                    meta.len(),
                    block.length
                ),
            });
        }
        Ok(Self {
            state_path: state_path.to_path_buf(),
            state: state_map,
            base: base_map,
            index,
        })
    }

    /// The base file's path, for the VM to map.
    pub fn base(&self) -> &Path {
        &self.index.path
    }

    /// The device and inode of the base file the pages are compared with.
    pub fn base_identity(&self) -> (u64, u64) {
        self.index.identity
    }

    /// Writes the state's stream to `out` without the records the base already holds.
    pub fn compose(&self, out: impl std::io::Write) -> Result<DiffStats, DiffError> {
        let base = BasePages {
            path: &self.index.path,
            map: &self.base,
            index: Some(&self.index),
        };
        let (mut out, stats) = write_changed(&self.state_path, self.state.bytes(), &base, &[], &self.state_path, out)?;
        out.flush().map_err(io(&self.state_path))?;
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{load, stream};
    use super::*;

    #[test]
    fn a_whole_state_over_its_base_loads_only_changed_pages_to_the_same_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        // Base: page 0 = 1, page 1 = 2, page 2 zero bytes, page 3 a hole.
        let mut base = vec![1u8; PAGE_SIZE];
        base.extend([2u8; PAGE_SIZE]);
        base.extend([0u8; PAGE_SIZE]);
        std::fs::write(path("base"), &base).unwrap();
        File::options()
            .write(true)
            .open(path("base"))
            .unwrap()
            .set_len(4 * PAGE_SIZE as u64)
            .unwrap();
        let index = Arc::new(BaseIndex::build(&path("base")).unwrap());
        assert_eq!(index.zero_pages(), 2);
        assert!(!index.is_zero(0) && !index.is_zero(PAGE_SIZE as u64));
        assert!(index.is_zero(2 * PAGE_SIZE as u64) && index.is_zero(3 * PAGE_SIZE as u64));
        // The state: page 0 as in the base, page 1 cleared, page 2 written, page 3 zero.
        let full = stream(&[(0, 1), (1, 0), (2, 7), (3, 0)]);
        std::fs::write(path("state"), &full).unwrap();
        let state = File::open(path("state")).unwrap();
        let over = OverBase::open(&path("state"), &state, index.clone()).unwrap();
        let mut composed = Vec::new();
        let stats = over.compose(&mut composed).unwrap();
        assert_eq!((stats.records, stats.kept), (4, 2));
        // The state's file is still read from its start (a fallback hands it to QEMU).
        let mut start = [0u8; 4];
        std::io::Read::read_exact(&mut &state, &mut start).unwrap();
        assert_eq!(start, full[..4]);
        assert_eq!(load(&base, &[composed]), load(&[], &[full]));

        // A base that is not the size of the guest's memory is refused, naming it.
        std::fs::write(path("short"), &base).unwrap();
        let short = Arc::new(BaseIndex::build(&path("short")).unwrap());
        let err = OverBase::open(&path("state"), &state, short).unwrap_err().to_string();
        assert!(err.contains("short") && err.contains("bytes"), "{err}");

        // So is a file put in the indexed one's place since.
        std::fs::rename(path("base"), path("old")).unwrap();
        std::fs::copy(path("old"), path("base")).unwrap();
        assert!(!index.describes(&std::fs::metadata(path("base")).unwrap()));
        let err = OverBase::open(&path("state"), &state, index).unwrap_err().to_string();
        assert!(err.contains("changed"), "{err}");
    }
}
