//! Template memory files backed by 2 MiB pages.
//!
//! Every sandbox VM maps its template's memory file privately, and QEMU reads all of it at the
//! VM's first save (a pause, fork or snapshot checks every page for zeros). Backed by 4 KiB
//! pages, that read costs a page-table entry, a page fault per 16 pages and a TLB miss per
//! page in every VM: measured on this kind of machine (a `base` template of 512 MiB), reading
//! the first bytes of every page of a private mapping took 130–230 ms over 4 KiB pages and 19
//! ms over 2 MiB pages, and a sandbox's first pause (TCG) took 128 instead of 187 ms (p50 of
//! 10, two servers side by side). A tmpfs file mapped privately at a 2 MiB boundary (QEMU's
//! `align=2M`) is mapped through 2 MiB entries where its page cache holds 2 MiB pages, so the
//! file's pages are collapsed into such pages once (`MADV_COLLAPSE`, Linux 6.1 and later,
//! which does not need the tmpfs to be mounted with `huge=`): when the template snapshot is
//! saved, or, for one an earlier server saved, when a server first uses it. A guest's write to
//! such a range splits that mapping and copies one 4 KiB page, as before.
//!
//! Holes are allocated first (`fallocate`): a 2 MiB range without any page cannot be
//! collapsed, and a read of a hole through a private mapping allocates a 4 KiB page in the file
//! anyway, so after the first save of any of its sandboxes a template's file held all its
//! pages before this change too (497 of 512 MiB, measured).
//!
//! Invariants: the file's bytes never change (collapsing copies pages, and allocated holes
//! read as zeros, as holes do); a kernel that refuses (older than 6.1, `shmem_enabled` set to
//! `deny`, no 2 MiB pages free) leaves the file correct and only slower to read; nothing here
//! changes a host setting.

use std::os::fd::AsRawFd as _;
use std::path::Path;

/// The size of a transparent huge page on x86-64.
pub const HUGE_PAGE: u64 = 2 << 20;

/// Allocates the holes of memory file `path` (on tmpfs) and collapses its pages into 2 MiB
/// pages; an error says why it could not, and leaves the file's bytes as they were.
pub fn collapse_file(path: &Path) -> std::io::Result<()> {
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    if len == 0 || !len.is_multiple_of(HUGE_PAGE) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{} bytes is not a whole number of 2 MiB pages", len),
        ));
    }
    let fd = file.as_raw_fd();
    // SAFETY: fallocate on a descriptor we own; no memory is passed.
    if unsafe { libc::fallocate(fd, 0, 0, len as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mapping = AlignedMapping::new(fd, len as usize, libc::MAP_SHARED)?;
    // SAFETY: the range is the shared mapping `mapping` owns; MADV_COLLAPSE only changes how
    // the file's pages are backed, never their contents.
    if unsafe { libc::madvise(mapping.start, len as usize, libc::MADV_COLLAPSE) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A read-only mapping of a whole file at a 2 MiB-aligned address (a huge page can only back
/// an aligned range), unmapped on drop.
struct AlignedMapping {
    /// The reservation: `len + HUGE_PAGE` bytes, the file mapped over an aligned part of it.
    reserved: *mut libc::c_void,
    reserved_len: usize,
    start: *mut libc::c_void,
}

impl AlignedMapping {
    fn new(fd: std::os::fd::RawFd, len: usize, sharing: libc::c_int) -> std::io::Result<Self> {
        let reserved_len = len + HUGE_PAGE as usize;
        // SAFETY: a new anonymous reservation with no access; nothing else refers to it.
        let reserved = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserved_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if reserved == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let aligned = (reserved as usize).next_multiple_of(HUGE_PAGE as usize);
        // SAFETY: MAP_FIXED over `[aligned, aligned + len)`, which lies inside the reservation
        // this value owns, so no other mapping is replaced.
        let start = unsafe {
            libc::mmap(
                aligned as *mut libc::c_void,
                len,
                libc::PROT_READ,
                sharing | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        let mapping = Self {
            reserved,
            reserved_len,
            start,
        };
        if start == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(mapping)
    }
}

impl Drop for AlignedMapping {
    fn drop(&mut self) {
        // SAFETY: the reservation (and the file mapped inside it) is this value's alone, and
        // no reference into it outlives the value.
        unsafe { libc::munmap(self.reserved, self.reserved_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    /// Bytes of `/proc/self/smaps_rollup`'s `ShmemPmdMapped`: tmpfs pages mapped 2 MiB at a time.
    fn shmem_pmd_mapped() -> u64 {
        let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
        rollup
            .lines()
            .find_map(|l| l.strip_prefix("ShmemPmdMapped:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            << 10
    }

    #[test]
    fn a_collapsed_file_keeps_its_bytes_and_maps_privately_through_huge_pages() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("t.mem");
        let len = 8 * HUGE_PAGE;
        let mut file = std::fs::File::create(&path).unwrap();
        file.set_len(len).unwrap();
        // Data in two of the eight 2 MiB ranges; the rest are holes.
        use std::os::unix::fs::FileExt as _;
        file.write_all_at(&[7u8; 4096], 4096).unwrap();
        file.write_all_at(b"vivarium", 5 * HUGE_PAGE + 12345).unwrap();
        file.flush().unwrap();
        drop(file);
        let before = std::fs::read(&path).unwrap();

        match collapse_file(&path) {
            Ok(()) => {}
            // A kernel without file MADV_COLLAPSE: nothing to check beyond the bytes.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("MADV_COLLAPSE refused here: {err}");
                assert_eq!(std::fs::read(&path).unwrap(), before);
                return;
            }
            Err(err) => panic!("collapsing: {err}"),
        }
        assert_eq!(
            std::fs::read(&path).unwrap(),
            before,
            "collapsing changed the file's bytes"
        );

        // A private mapping of the file, as a sandbox's QEMU makes it, reads through 2 MiB
        // entries.
        let file = std::fs::File::open(&path).unwrap();
        let mapped_before = shmem_pmd_mapped();
        let mapping = AlignedMapping::new(file.as_raw_fd(), len as usize, libc::MAP_PRIVATE).unwrap();
        // SAFETY: the mapping is readable, `len` bytes long and lives until the end of the test.
        // SAFETY: the mapping is readable, `len` bytes long and outlives `bytes`.
        let bytes = unsafe { std::slice::from_raw_parts(mapping.start as *const u8, len as usize) };
        let sum: u64 = bytes.iter().step_by(4096).map(|b| u64::from(*b)).sum();
        assert_eq!(sum, 7, "the first page's byte and zeros elsewhere");
        assert_eq!(&bytes[(5 * HUGE_PAGE + 12345) as usize..][..8], b"vivarium");
        assert!(
            shmem_pmd_mapped() >= mapped_before + len,
            "the mapping was not backed by 2 MiB pages: ShmemPmdMapped {} -> {}",
            mapped_before,
            shmem_pmd_mapped()
        );
    }

    #[test]
    fn a_file_that_is_not_whole_huge_pages_is_refused() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("t.mem");
        std::fs::File::create(&path).unwrap().set_len(HUGE_PAGE + 4096).unwrap();
        let err = collapse_file(&path).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}
