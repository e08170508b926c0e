//! Memory diff snapshots: a saved state that keeps only the guest pages that differ from its
//! parent's memory, and the stream that restores a chain of them.
//!
//! A chain is a *base* (a raw image of the guest's memory backend block, e.g. a template's
//! memory file; mapped privately by the restoring QEMU) and diff states, root first. Every diff
//! is itself a complete migration stream ([`crate::migstream`]) whose page records are those of
//! the full save that differ from the composed memory of base plus the diffs before it; pages of
//! other RAM blocks (firmware, ROMs) are always kept. Composing writes the leaf's prefix and
//! setup, every diff's records root to leaf (later records overwrite earlier ones as QEMU loads
//! them; a zero record clears a page only if it is not already zero), then the leaf's RAM end
//! and device sections.
//!
//! Invariants: a diff is written to a temporary name, synced and renamed, so a crash never
//! leaves a partial one under its final name; every error names the file it concerns; the base
//! and the chain are only read.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::migstream::{self, Content, Stream, PAGE_SIZE};

mod over_base;
pub use over_base::{BaseIndex, OverBase};

/// The RAM block of the guest's memory backend (`-object memory-backend-*,id=mem`).
pub const BASE_BLOCK: &str = "mem";

/// Why a diff could not be made or a chain composed.
#[derive(Debug, thiserror::Error)]
pub enum DiffError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A file is not a stream this module understands (damaged, or another format).
    #[error("{} is damaged or not a memory state: {source}", path.display())]
    Stream {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: migstream::StreamError,
    },
    /// The parts of a chain do not fit together.
    #[error("{}: {what}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// How.
        what: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DiffError + '_ {
    move |source| DiffError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, DiffError> {
    std::fs::read(path).map_err(io(path))
}

fn parse<'a>(path: &Path, buf: &'a [u8]) -> Result<Stream<'a>, DiffError> {
    migstream::parse(buf).map_err(|source| DiffError::Stream {
        path: path.to_path_buf(),
        source,
    })
}

/// What a diff kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiffStats {
    /// Page records in the full save.
    pub records: usize,
    /// Page records kept.
    pub kept: usize,
    /// Bytes of the diff file.
    pub bytes: u64,
}

/// A read-only private mapping of a base file.
struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
    /// The file's data extents (start, end), in order: a page outside them is a hole, read as
    /// zeros without touching the mapping (a read fault on a hole of a tmpfs file, where
    /// template memory lives, would allocate a page of it).
    data: Vec<(u64, u64)>,
}

// SAFETY: a `Mapping` is a read-only mapping of a file that is never written or truncated while
// mapped (base files and node states are immutable once in place; see `page`); reading it from
// several threads, or from another thread than the one that made it, is as safe as reading a
// `&[u8]`.
unsafe impl Send for Mapping {}
// SAFETY: as above: no method mutates the mapping or its bytes.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(path: &Path) -> Result<Self, DiffError> {
        let file = File::open(path).map_err(io(path))?;
        Self::of_file(path, &file)
    }

    /// Maps `file` (the file at `path`, named in errors) whole; the mapping outlives `file`.
    fn of_file(path: &Path, file: &File) -> Result<Self, DiffError> {
        let mut mapping = Self::whole(path, file)?;
        mapping.data = data_extents(path, file, mapping.len as u64)?;
        Ok(mapping)
    }

    /// Like [`Mapping::of_file`], without looking for holes (on a large tmpfs file that takes
    /// milliseconds): every page is read through the mapping, for callers that know where the
    /// holes are or read the whole file anyway.
    fn whole(path: &Path, file: &File) -> Result<Self, DiffError> {
        let len = file.metadata().map_err(io(path))?.len() as usize;
        if len == 0 {
            return Ok(Self {
                ptr: std::ptr::null_mut(),
                len: 0,
                data: Vec::new(),
            });
        }
        // SAFETY: a fresh read-only private mapping of a file we opened; the kernel picks the
        // address; the result is checked before use and unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                std::os::fd::AsRawFd::as_raw_fd(file),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io(path)(std::io::Error::last_os_error()));
        }
        Ok(Self {
            ptr,
            len,
            data: vec![(0, len as u64)],
        })
    }

    /// The whole mapped file.
    fn bytes(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr..ptr+len` is a live read-only mapping (unmapped only in Drop); its
        // file is not written while mapped (see `page`).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }

    /// The page at `offset`, or None past the end (reads as zeros).
    fn page(&self, offset: u64) -> Option<&[u8]> {
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(PAGE_SIZE)?;
        if end > self.len {
            return None;
        }
        let extent = self.data.partition_point(|&(from, _)| from <= offset);
        if extent == 0 || self.data[extent - 1].1 <= offset {
            return None;
        }
        // SAFETY: `ptr..ptr+len` is a live read-only mapping (unmapped only in Drop, which
        // needs `&mut self`), and `start..end` lies inside it. Base files are never written
        // while in use (they are immutable once persisted), so the bytes do not change.
        Some(unsafe { std::slice::from_raw_parts((self.ptr as *const u8).add(start), PAGE_SIZE) })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: unmaps exactly the mapping made in `new`; no slice of it outlives `self`.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

/// Whether `bytes` are all zero, compared a page at a time with `memcmp` (a byte loop with an
/// early exit is several times slower, and restores compare every page of a state).
fn is_zero(bytes: &[u8]) -> bool {
    static ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
    bytes.chunks(PAGE_SIZE).all(|chunk| chunk == &ZERO[..chunk.len()])
}

/// The parts of a chain read into memory (file name, bytes), root first.
pub type Parts = Vec<(PathBuf, Vec<u8>)>;

/// Reads the parts of a chain from files the caller opened (a file later renamed over one of
/// their names does not change what is read).
pub fn read_parts(files: Vec<(PathBuf, File)>) -> Result<Parts, DiffError> {
    files
        .into_iter()
        .map(|(path, mut file)| {
            let mut buf = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut buf).map_err(io(&path))?;
            Ok((path, buf))
        })
        .collect()
}

/// Writes `out` from the full save `full`: only its records that differ from the memory
/// composed of `base` and the diffs `chain` (read with [`read_parts`], root first). Written to
/// `out` + `.tmp`, synced, renamed.
pub fn make_diff(full: &Path, base: &Path, chain: &[(PathBuf, Vec<u8>)], out: &Path) -> Result<DiffStats, DiffError> {
    let full_buf = read(full)?;
    let base_map = Mapping::new(base)?;
    let tmp = out.with_extension("tmp");
    let file = create_private(&tmp)?;
    let pages = BasePages {
        path: base,
        map: &base_map,
        index: None,
    };
    let (file, mut stats) = write_changed(full, &full_buf, &pages, chain, &tmp, file)?;
    file.sync_all().map_err(io(&tmp))?;
    stats.bytes = file.metadata().map_err(io(&tmp))?.len();
    drop(file);
    std::fs::rename(&tmp, out).map_err(io(out))?;
    Ok(stats)
}

/// The base a save is compared with.
struct BasePages<'a> {
    /// Its path, named in errors.
    path: &'a Path,
    /// Its mapping.
    map: &'a Mapping,
    /// What is known of it, to skip its zero pages without reading them.
    index: Option<&'a BaseIndex>,
}

impl BasePages<'_> {
    /// The page at `offset`, or None if it is zero (a hole, past the end, or known zero).
    fn page(&self, offset: u64) -> Option<&[u8]> {
        if self.index.is_some_and(|i| i.is_zero(offset)) {
            return None;
        }
        self.map.page(offset)
    }
}

/// Writes to `out` (named `out_path` in errors) the stream of full save `full` (the bytes of
/// the file at `full_path`) with only its records that differ from the memory composed of
/// `base` and the diffs `chain`; records of other RAM blocks are all kept. `bytes` of the
/// stats is left 0.
fn write_changed<W: std::io::Write>(
    full_path: &Path,
    full_buf: &[u8],
    base: &BasePages<'_>,
    chain: &[(PathBuf, Vec<u8>)],
    out_path: &Path,
    out: W,
) -> Result<(W, DiffStats), DiffError> {
    let stream = parse(full_path, full_buf)?;
    let base_index = stream.block(BASE_BLOCK).ok_or_else(|| DiffError::Mismatch {
        path: full_path.to_path_buf(),
        what: format!("no RAM block '{BASE_BLOCK}'"),
    })?;
    let block_len = stream.blocks[base_index].length as usize;
    if base.map.len > block_len {
        return Err(DiffError::Mismatch {
            path: base.path.to_path_buf(),
            what: format!(
                "the base is larger ({} bytes) than the guest's memory ({block_len})",
                base.map.len
            ),
        });
    }
    // The parents' pages of the base block: (chain file, content), the last writer winning.
    let mut parents: HashMap<u64, (usize, Content)> = HashMap::new();
    for (i, (path, buf)) in chain.iter().enumerate() {
        let parent = parse(path, buf)?;
        check_blocks(path, &parent, &stream)?;
        let index = parent.block(BASE_BLOCK).expect("blocks checked");
        for r in parent.records.iter().filter(|r| r.block == index) {
            parents.insert(r.offset, (i, r.content));
        }
    }
    let mut writer = migstream::Writer::new(BufWriter::with_capacity(1 << 20, out), &stream).map_err(io(out_path))?;
    let mut stats = DiffStats {
        records: stream.records.len(),
        ..DiffStats::default()
    };
    for record in &stream.records {
        let data = match record.content {
            Content::Zero => None,
            Content::Data(at) => Some(&full_buf[at..at + PAGE_SIZE]),
        };
        if record.block == base_index {
            // None: a page known to be zero without reading it.
            let parent: Option<&[u8]> = match parents.get(&record.offset) {
                Some((_, Content::Zero)) => None,
                Some((i, Content::Data(at))) => Some(&chain[*i].1[*at..*at + PAGE_SIZE]),
                None => base.page(record.offset),
            };
            let same = match (data, parent) {
                (None, None) => true,
                (None, Some(parent)) => is_zero(parent),
                (Some(data), None) => is_zero(data),
                (Some(data), Some(parent)) => data == parent,
            };
            if same {
                continue;
            }
        }
        stats.kept += 1;
        writer
            .page(&stream.blocks[record.block].name, record.offset, data)
            .map_err(io(out_path))?;
    }
    let out = writer
        .finish(&stream.commands, stream.tail)
        .and_then(|w| w.into_inner().map_err(|e| e.into_error()))
        .map_err(io(out_path))?;
    Ok((out, stats))
}

fn check_blocks(path: &Path, part: &Stream<'_>, leaf: &Stream<'_>) -> Result<(), DiffError> {
    if part.blocks != leaf.blocks {
        return Err(DiffError::Mismatch {
            path: path.to_path_buf(),
            what: "its RAM blocks differ from the rest of the chain's".into(),
        });
    }
    if part.block(BASE_BLOCK).is_none() {
        return Err(DiffError::Mismatch {
            path: path.to_path_buf(),
            what: format!("no RAM block '{BASE_BLOCK}'"),
        });
    }
    Ok(())
}

/// The parts of a chain, read and checked: a restore fails before QEMU starts loading if one
/// is missing or damaged, and the error names it.
pub struct Chain {
    parts: Vec<(PathBuf, Vec<u8>)>,
}

impl std::fmt::Debug for Chain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.parts.iter().map(|(p, _)| p)).finish()
    }
}

impl Chain {
    /// Reads and checks diffs `parts` (root first, the leaf last).
    pub fn load(parts: &[PathBuf]) -> Result<Self, DiffError> {
        let parts: Parts = parts
            .iter()
            .map(|p| Ok((p.clone(), read(p)?)))
            .collect::<Result<_, DiffError>>()?;
        Self::from_parts(parts)
    }

    /// Checks diffs already read (root first, the leaf last).
    pub fn from_parts(parts: Parts) -> Result<Self, DiffError> {
        let (leaf_path, leaf_buf) = parts.last().ok_or_else(|| DiffError::Mismatch {
            path: PathBuf::new(),
            what: "an empty chain".into(),
        })?;
        let leaf = parse(leaf_path, leaf_buf)?;
        for (path, buf) in &parts {
            check_blocks(path, &parse(path, buf)?, &leaf)?;
        }
        Ok(Self { parts })
    }

    /// Writes the composed stream (the leaf's prefix, setup and device state; every part's
    /// pages, root first) to `out`.
    pub fn compose(&self, out: impl std::io::Write) -> Result<(), DiffError> {
        let (leaf_path, leaf_buf) = self.parts.last().expect("a loaded chain is not empty");
        let leaf = parse(leaf_path, leaf_buf)?;
        let mut writer =
            migstream::Writer::new(BufWriter::with_capacity(1 << 20, out), &leaf).map_err(io(leaf_path))?;
        for (path, buf) in &self.parts {
            let part = parse(path, buf)?;
            migstream::copy_records(&mut writer, &part, buf).map_err(io(path))?;
        }
        writer
            .finish(&leaf.commands, leaf.tail)
            .and_then(|mut w| w.flush())
            .map_err(io(leaf_path))
    }
}

impl Chain {
    /// Writes the chain on `base` as one whole state, which restores without the base (onto
    /// zeroed memory, on another host): the leaf's prefix, setup and device state; every
    /// non-zero page of `base` that no part records (read once, holes skipped); then every
    /// part's records, root first, as [`Chain::compose`] writes them.
    pub fn compose_whole(&self, base: &Path, out: impl std::io::Write) -> Result<(), DiffError> {
        let (leaf_path, leaf_buf) = self.parts.last().expect("a loaded chain is not empty");
        let leaf = parse(leaf_path, leaf_buf)?;
        let block = leaf.block(BASE_BLOCK).ok_or_else(|| DiffError::Mismatch {
            path: leaf_path.clone(),
            what: format!("no RAM block '{BASE_BLOCK}'"),
        })?;
        let length = leaf.blocks[block].length;
        let mut recorded = std::collections::HashSet::new();
        let parsed: Vec<Stream<'_>> = self
            .parts
            .iter()
            .map(|(path, buf)| parse(path, buf))
            .collect::<Result<_, _>>()?;
        for part in &parsed {
            let mem = part.block(BASE_BLOCK);
            recorded.extend(part.records.iter().filter(|r| Some(r.block) == mem).map(|r| r.offset));
        }
        let source = File::open(base).map_err(io(base))?;
        let len = source.metadata().map_err(io(base))?.len().min(length);
        let mut writer =
            migstream::Writer::new(BufWriter::with_capacity(1 << 20, out), &leaf).map_err(io(leaf_path))?;
        for_each_page_with_data(base, &source, len, |offset, page| {
            if recorded.contains(&offset) {
                return Ok(());
            }
            if page.len() != PAGE_SIZE {
                return Err(DiffError::Mismatch {
                    path: base.to_path_buf(),
                    what: "a length that is not a whole number of pages".into(),
                });
            }
            writer.page(BASE_BLOCK, offset, Some(page)).map_err(io(leaf_path))
        })?;
        writer.end_section().map_err(io(leaf_path))?;
        for ((path, buf), part) in self.parts.iter().zip(&parsed) {
            migstream::copy_records(&mut writer, part, buf).map_err(io(path))?;
        }
        writer
            .finish(&leaf.commands, leaf.tail)
            .and_then(|mut w| w.flush())
            .map_err(io(leaf_path))
    }
}

/// Copies memory file `from` to `to` (a temporary name, synced, sealed read-only, then renamed),
/// writing only its non-zero pages: the copy is sparse. Holes of `from` are skipped without
/// reading them (`SEEK_DATA`/`SEEK_HOLE`).
pub fn persist_base(from: &Path, to: &Path) -> Result<u64, DiffError> {
    let source = File::open(from).map_err(io(from))?;
    let len = source.metadata().map_err(io(from))?.len();
    let tmp = to.with_extension("tmp");
    let file = create_private(&tmp)?;
    file.set_len(len).map_err(io(&tmp))?;
    for_each_page_with_data(from, &source, len, |offset, page| {
        file.write_all_at(page, offset).map_err(io(&tmp))
    })?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    // Frozen like a disk layer: root's, readable by the (jailed) VMs that map it.
    crate::confine::seal(&tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, to).map_err(io(to))?;
    if let Some(dir) = to.parent() {
        if let Ok(dir) = File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(len)
}

/// Calls `each` with the offset and bytes of every non-zero page of `source` (the file at
/// `path`, `len` bytes long) in order; its holes are skipped without reading them
/// (`SEEK_DATA`/`SEEK_HOLE`).
fn for_each_page_with_data(
    path: &Path,
    source: &File,
    len: u64,
    mut each: impl FnMut(u64, &[u8]) -> Result<(), DiffError>,
) -> Result<(), DiffError> {
    let mut chunk = vec![0u8; 1 << 20];
    for (data, end) in data_extents(path, source, len)? {
        let mut offset = data;
        while offset < end {
            let n = chunk.len().min((end - offset) as usize);
            source.read_exact_at(&mut chunk[..n], offset).map_err(io(path))?;
            for (i, page) in chunk[..n].chunks(PAGE_SIZE).enumerate() {
                if !is_zero(page) {
                    each(offset + (i * PAGE_SIZE) as u64, page)?;
                }
            }
            offset += n as u64;
        }
    }
    Ok(())
}

/// The data extents (start, end) of `source` (the file at `path`) within its first `len`
/// bytes, in order, found with `SEEK_DATA`/`SEEK_HOLE` without reading the file. The file's
/// offset is put back where it was: a caller may hand the same open file to QEMU to read.
fn data_extents(path: &Path, source: &File, len: u64) -> Result<Vec<(u64, u64)>, DiffError> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(source);
    // SAFETY: lseek on a descriptor the caller keeps open; no memory is passed.
    let was = unsafe { libc::lseek(fd, 0, libc::SEEK_CUR) };
    let extents = seek_extents(path, fd, len);
    if was >= 0 {
        // SAFETY: as above.
        unsafe { libc::lseek(fd, was, libc::SEEK_SET) };
    }
    extents
}

fn seek_extents(path: &Path, fd: std::os::fd::RawFd, len: u64) -> Result<Vec<(u64, u64)>, DiffError> {
    let mut extents = Vec::new();
    let mut at: u64 = 0;
    while at < len {
        // SAFETY: lseek on a descriptor the caller keeps open; no memory is passed.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // Only a hole remains.
            }
            return Err(io(path)(err));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io(path)(std::io::Error::last_os_error()));
        }
        // Extents start on page boundaries (the file system's blocks are pages or larger).
        let (data, end) = (data as u64, (hole as u64).min(len));
        if data >= end {
            break;
        }
        extents.push((data, end));
        at = end;
    }
    Ok(extents)
}

/// Creates (or truncates) `path` for writing, readable only by its owner (it holds guest memory).
fn create_private(path: &Path) -> Result<File, DiffError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migstream::Writer;

    /// A stream of `pages` (offset, byte; 0 = a zero record) of block `mem` (4 pages).
    pub(super) fn stream(pages: &[(u64, u8)]) -> Vec<u8> {
        let mut s = Vec::new();
        s.extend(0x5145_564du32.to_be_bytes());
        s.extend(3u32.to_be_bytes());
        s.extend([1, 0, 0, 0, 2, 3, b'r', b'a', b'm', 0, 0, 0, 0, 0, 0, 0, 4]);
        s.extend(((4 * PAGE_SIZE as u64) | 4).to_be_bytes());
        s.extend([3, b'm', b'e', b'm']);
        s.extend((4 * PAGE_SIZE as u64).to_be_bytes());
        s.extend(0x10u64.to_be_bytes());
        s.extend([0x7e, 0, 0, 0, 2]);
        let mut empty = s;
        empty.extend([3, 0, 0, 0, 2]);
        empty.extend(0x10u64.to_be_bytes());
        empty.extend([0x7e, 0, 0, 0, 2]);
        let parsed = migstream::parse(&empty).unwrap();
        let mut w = Writer::new(Vec::new(), &parsed).unwrap();
        for &(page, byte) in pages {
            let data = [byte; PAGE_SIZE];
            w.page("mem", page * PAGE_SIZE as u64, (byte != 0).then_some(&data[..]))
                .unwrap();
        }
        w.finish(&[], &[4, 0xee]).unwrap()
    }

    /// Parts read the way a caller reads them: opened first, read from the open files.
    fn opened(paths: &[PathBuf]) -> Parts {
        read_parts(paths.iter().map(|p| (p.clone(), File::open(p).unwrap())).collect()).unwrap()
    }

    /// The guest memory QEMU would load: `base` then every record of `streams` in order.
    pub(super) fn load(base: &[u8], streams: &[Vec<u8>]) -> Vec<u8> {
        let mut memory = base.to_vec();
        memory.resize(4 * PAGE_SIZE, 0);
        for buf in streams {
            let s = migstream::parse(buf).unwrap();
            for r in &s.records {
                let at = r.offset as usize;
                match r.content {
                    Content::Zero => memory[at..at + PAGE_SIZE].fill(0),
                    Content::Data(d) => memory[at..at + PAGE_SIZE].copy_from_slice(&buf[d..d + PAGE_SIZE]),
                }
            }
        }
        memory
    }

    #[test]
    fn diffs_keep_only_changed_pages_and_chains_compose_to_the_saved_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        // Base: page 0 = 1, page 1 = 2, pages 2 and 3 a hole (zero).
        let mut base = vec![1u8; PAGE_SIZE];
        base.extend([2u8; PAGE_SIZE]);
        base.resize(4 * PAGE_SIZE, 0);
        std::fs::write(path("memory"), &base).unwrap();
        persist_base(&path("memory"), &path("base.mem")).unwrap();
        assert_eq!(std::fs::read(path("base.mem")).unwrap(), base);
        // First save: page 1 cleared, page 2 written; pages 0 and 3 as in the base.
        let full1 = stream(&[(0, 1), (1, 0), (2, 7), (3, 0)]);
        std::fs::write(path("full1"), &full1).unwrap();
        let stats = make_diff(&path("full1"), &path("base.mem"), &[], &path("d1")).unwrap();
        assert_eq!((stats.records, stats.kept), (4, 2));
        // Second save on top: page 2 back to zero, page 3 written.
        let full2 = stream(&[(0, 1), (1, 0), (2, 0), (3, 9)]);
        std::fs::write(path("full2"), &full2).unwrap();
        let stats = make_diff(&path("full2"), &path("base.mem"), &opened(&[path("d1")]), &path("d2")).unwrap();
        assert_eq!(stats.kept, 2);
        let chain = Chain::load(&[path("d1"), path("d2")]).unwrap();
        let mut composed = Vec::new();
        chain.compose(&mut composed).unwrap();
        assert_eq!(
            load(&base, &[composed.clone()]),
            load(&[], std::slice::from_ref(&full2))
        );
        assert_eq!(migstream::parse(&composed).unwrap().tail, &[4, 0xee]);
        // As one whole state it loads onto zeroed memory, without the base, to the same memory:
        // page 0 comes from the base (no diff records it), the others from the diffs.
        let mut whole = Vec::new();
        chain.compose_whole(&path("base.mem"), &mut whole).unwrap();
        assert_eq!(load(&[], &[whole.clone()]), load(&[], &[full2]));
        let parsed = migstream::parse(&whole).unwrap();
        assert_eq!(parsed.tail, &[4, 0xee]);
        // Base page 1 is cleared by the first diff: it is written once, as that diff's zero.
        assert_eq!(
            parsed.records.iter().filter(|r| r.offset == PAGE_SIZE as u64).count(),
            1
        );
    }

    #[test]
    fn a_damaged_part_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        let bad = dir.path().join("bad");
        std::fs::write(&good, stream(&[(0, 1)])).unwrap();
        std::fs::write(&bad, &stream(&[(0, 1)])[..40]).unwrap();
        let err = Chain::load(&[bad.clone(), good.clone()]).unwrap_err().to_string();
        assert!(err.contains(&bad.display().to_string()), "{err}");
        let err = Chain::load(&[dir.path().join("gone"), good]).unwrap_err().to_string();
        assert!(err.contains("gone"), "{err}");
    }
}
