//! The host side of a volume mounted in a sandbox: a FUSE file server over the volume's
//! directory. The guest's kernel speaks the FUSE protocol to `/dev/fuse`; the agent relays each
//! request unchanged over the agent channel, and [`FuseSession::handle`] answers it here.
//!
//! Invariants:
//! - every request is untrusted (the guest's root may write anything to `/dev/fuse`): lengths
//!   are checked before reading, names are single components (no `/`, `.`, `..`), and every
//!   file system call is relative to a descriptor of a node inside the volume and never follows
//!   a symlink, so nothing outside the volume is reached;
//! - node ids are indices into this session's table, which holds an `O_PATH` descriptor per
//!   node until the kernel forgets it; an unknown id is `ESTALE`;
//! - no caching is granted (zero entry and attribute validity): every lookup and `stat` asks
//!   the host, so writes of other sandboxes and of the content API are seen at the next open.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt as _;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_READLINK: u32 = 5;
const FUSE_SYMLINK: u32 = 6;
const FUSE_MKDIR: u32 = 9;
const FUSE_UNLINK: u32 = 10;
const FUSE_RMDIR: u32 = 11;
const FUSE_RENAME: u32 = 12;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_FSYNCDIR: u32 = 30;
const FUSE_CREATE: u32 = 35;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;
const FUSE_RENAME2: u32 = 45;

const FATTR_MODE: u32 = 1;
const FATTR_UID: u32 = 2;
const FATTR_GID: u32 = 4;
const FATTR_SIZE: u32 = 8;
const FATTR_ATIME: u32 = 16;
const FATTR_MTIME: u32 = 32;
const FATTR_FH: u32 = 64;
const FATTR_ATIME_NOW: u32 = 128;
const FATTR_MTIME_NOW: u32 = 256;

/// Largest write the kernel is told it may send (and so the relay's read buffer less a page).
pub const MAX_WRITE: u32 = 128 * 1024;
/// Size of a request header.
pub const IN_HEADER: usize = 40;
/// Size of a reply header.
pub const OUT_HEADER: usize = 16;
/// Most open files and directories per session.
const MAX_HANDLES: usize = 4096;
/// Most nodes the kernel may hold per session.
const MAX_NODES: usize = 1 << 20;
const ROOT: u64 = 1;

/// Reads little-endian fields off a request body, failing with `EINVAL` when it is short.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn u32(&mut self) -> Result<u32, i32> {
        let (head, rest) = self.data.split_first_chunk::<4>().ok_or(libc::EINVAL)?;
        self.data = rest;
        Ok(u32::from_le_bytes(*head))
    }

    fn u64(&mut self) -> Result<u64, i32> {
        let (head, rest) = self.data.split_first_chunk::<8>().ok_or(libc::EINVAL)?;
        self.data = rest;
        Ok(u64::from_le_bytes(*head))
    }

    fn skip(&mut self, n: usize) -> Result<(), i32> {
        self.data = self.data.get(n..).ok_or(libc::EINVAL)?;
        Ok(())
    }

    /// A NUL-terminated single path component.
    fn name(&mut self) -> Result<CString, i32> {
        let end = self.data.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
        let name = &self.data[..end];
        self.data = &self.data[end + 1..];
        if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
            return Err(libc::EINVAL);
        }
        if name.len() > 255 {
            return Err(libc::ENAMETOOLONG);
        }
        CString::new(name).map_err(|_| libc::EINVAL)
    }

    /// A NUL-terminated byte string (a symlink's target).
    fn bytes(&mut self) -> Result<CString, i32> {
        let end = self.data.iter().position(|&b| b == 0).ok_or(libc::EINVAL)?;
        let out = CString::new(&self.data[..end]).map_err(|_| libc::EINVAL)?;
        self.data = &self.data[end + 1..];
        Ok(out)
    }
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

fn io_errno(err: io::Error) -> i32 {
    err.raw_os_error().unwrap_or(libc::EIO)
}

fn check(rc: libc::c_int) -> Result<(), i32> {
    if rc < 0 {
        Err(errno())
    } else {
        Ok(())
    }
}

fn stat_fd(fd: BorrowedFd<'_>) -> Result<libc::stat, i32> {
    // SAFETY: `stat` is plain data; the kernel fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: an empty C string with AT_EMPTY_PATH stats `fd` itself; `st` is writable.
    check(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

fn open_path(dir: BorrowedFd<'_>, name: &CString) -> Result<OwnedFd, i32> {
    // SAFETY: `name` is a valid C string.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just returned this descriptor, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens the inode an `O_PATH` descriptor names, with real access (`/proc/self/fd` reopens it;
/// callers check first that it is not a symlink).
fn reopen(fd: BorrowedFd<'_>, flags: i32) -> Result<OwnedFd, i32> {
    let link = CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL");
    // SAFETY: `link` is a valid C string.
    let out = unsafe { libc::open(link.as_ptr(), flags | libc::O_CLOEXEC) };
    if out < 0 {
        return Err(errno());
    }
    // SAFETY: the kernel just returned this descriptor, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(out) })
}

fn attr(st: &libc::stat, out: &mut Vec<u8>) {
    for v in [
        st.st_ino,
        st.st_size as u64,
        st.st_blocks as u64,
        st.st_atime as u64,
        st.st_mtime as u64,
        st.st_ctime as u64,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for v in [
        st.st_atime_nsec as u32,
        st.st_mtime_nsec as u32,
        st.st_ctime_nsec as u32,
        st.st_mode,
        st.st_nlink as u32,
        st.st_uid,
        st.st_gid,
        0,
        4096,
        0,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

struct Node {
    fd: OwnedFd,
    refs: u64,
    key: (u64, u64),
}

enum Handle {
    File(File),
    /// A directory's entries as read at open: `(inode, type, name)`.
    Dir(Vec<(u64, u32, Vec<u8>)>),
}

/// One mount's FUSE session over a volume's directory.
pub struct FuseSession {
    nodes: HashMap<u64, Node>,
    by_key: HashMap<(u64, u64), u64>,
    next_node: u64,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
}

impl FuseSession {
    /// A session whose root is the directory `root` (any descriptor of it).
    pub fn new(root: BorrowedFd<'_>) -> io::Result<Self> {
        let fd = reopen(root, libc::O_PATH | libc::O_DIRECTORY).map_err(io::Error::from_raw_os_error)?;
        let st = stat_fd(fd.as_fd()).map_err(io::Error::from_raw_os_error)?;
        let key = (st.st_dev, st.st_ino);
        let mut nodes = HashMap::new();
        nodes.insert(ROOT, Node { fd, refs: 1, key });
        Ok(Self {
            nodes,
            by_key: HashMap::from([(key, ROOT)]),
            next_node: ROOT + 1,
            handles: HashMap::new(),
            next_handle: 1,
        })
    }

    /// Answers one request (a whole message as `/dev/fuse` gave it); `None` for requests that
    /// take no answer (forget, interrupt) and for messages too short to carry a header.
    pub fn handle(&mut self, msg: &[u8]) -> Option<Vec<u8>> {
        let mut c = Cursor { data: msg };
        let len = c.u32().ok()? as usize;
        let opcode = c.u32().ok()?;
        let unique = c.u64().ok()?;
        let nodeid = c.u64().ok()?;
        let uid = c.u32().ok()?;
        let gid = c.u32().ok()?;
        c.skip(8).ok()?;
        let body = msg.get(IN_HEADER..len.min(msg.len()))?;
        if matches!(opcode, FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT) {
            self.forget(opcode, nodeid, body);
            return None;
        }
        let mut out = vec![0u8; OUT_HEADER];
        let result = self.dispatch(opcode, nodeid, (uid, gid), body, &mut out);
        let error = match result {
            Ok(()) => 0,
            Err(e) => {
                out.truncate(OUT_HEADER);
                -e
            }
        };
        let total = out.len() as u32;
        out[0..4].copy_from_slice(&total.to_le_bytes());
        out[4..8].copy_from_slice(&error.to_le_bytes());
        out[8..16].copy_from_slice(&unique.to_le_bytes());
        Some(out)
    }

    fn forget(&mut self, opcode: u32, nodeid: u64, body: &[u8]) {
        let mut c = Cursor { data: body };
        if opcode == FUSE_FORGET {
            if let Ok(n) = c.u64() {
                self.unref(nodeid, n);
            }
        } else if opcode == FUSE_BATCH_FORGET {
            let Ok(count) = c.u32() else { return };
            let _ = c.u32();
            for _ in 0..count {
                let (Ok(id), Ok(n)) = (c.u64(), c.u64()) else { return };
                self.unref(id, n);
            }
        }
    }

    fn unref(&mut self, nodeid: u64, n: u64) {
        if nodeid == ROOT {
            return;
        }
        if let Some(node) = self.nodes.get_mut(&nodeid) {
            node.refs = node.refs.saturating_sub(n);
            if node.refs == 0 {
                let key = node.key;
                self.nodes.remove(&nodeid);
                self.by_key.remove(&key);
            }
        }
    }

    fn node(&self, nodeid: u64) -> Result<BorrowedFd<'_>, i32> {
        self.nodes.get(&nodeid).map(|n| n.fd.as_fd()).ok_or(libc::ESTALE)
    }

    /// Looks `name` up in `parent` and appends a `fuse_entry_out`, counting one more reference.
    fn entry(&mut self, parent: u64, name: &CString, out: &mut Vec<u8>) -> Result<(), i32> {
        let fd = open_path(self.node(parent)?, name)?;
        let st = stat_fd(fd.as_fd())?;
        let key = (st.st_dev, st.st_ino);
        let nodeid = match self.by_key.get(&key) {
            Some(&id) => {
                let node = self.nodes.get_mut(&id).expect("keys name nodes");
                node.refs += 1;
                // The name may now lead to the same inode through another path; keep the newest.
                node.fd = fd;
                id
            }
            None => {
                if self.nodes.len() >= MAX_NODES {
                    return Err(libc::ENFILE);
                }
                let id = self.next_node;
                self.next_node += 1;
                self.nodes.insert(id, Node { fd, refs: 1, key });
                self.by_key.insert(key, id);
                id
            }
        };
        for v in [nodeid, 0, 0, 0] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[0u8; 8]);
        attr(&st, out);
        Ok(())
    }

    fn attr_out(&self, nodeid: u64, out: &mut Vec<u8>) -> Result<(), i32> {
        let st = stat_fd(self.node(nodeid)?)?;
        out.extend_from_slice(&[0u8; 16]);
        attr(&st, out);
        Ok(())
    }

    fn add_handle(&mut self, handle: Handle) -> Result<u64, i32> {
        if self.handles.len() >= MAX_HANDLES {
            return Err(libc::ENFILE);
        }
        let fh = self.next_handle;
        self.next_handle += 1;
        self.handles.insert(fh, handle);
        Ok(fh)
    }

    fn file(&self, fh: u64) -> Result<&File, i32> {
        match self.handles.get(&fh) {
            Some(Handle::File(f)) => Ok(f),
            _ => Err(libc::EBADF),
        }
    }

    /// Gives what a guest user made to that user.
    fn chown_new(&self, parent: u64, name: &CString, (uid, gid): (u32, u32)) -> Result<(), i32> {
        // SAFETY: `name` is a valid C string.
        check(unsafe {
            libc::fchownat(
                self.node(parent)?.as_raw_fd(),
                name.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    fn dispatch(
        &mut self,
        opcode: u32,
        nodeid: u64,
        caller: (u32, u32),
        body: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), i32> {
        let mut c = Cursor { data: body };
        match opcode {
            FUSE_INIT => {
                let major = c.u32()?;
                let _minor = c.u32()?;
                let max_readahead = c.u32()?;
                if major != 7 {
                    return Err(libc::EPROTO);
                }
                for v in [7u32, 31, max_readahead, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&16u16.to_le_bytes());
                out.extend_from_slice(&12u16.to_le_bytes());
                out.extend_from_slice(&MAX_WRITE.to_le_bytes());
                out.extend_from_slice(&1u32.to_le_bytes());
                out.extend_from_slice(&[0u8; 36]);
                Ok(())
            }
            FUSE_DESTROY | FUSE_FLUSH => Ok(()),
            FUSE_LOOKUP => {
                let name = c.name()?;
                self.entry(nodeid, &name, out)
            }
            FUSE_GETATTR => self.attr_out(nodeid, out),
            FUSE_SETATTR => {
                let valid = c.u32()?;
                c.skip(4)?;
                let fh = c.u64()?;
                let size = c.u64()?;
                c.skip(8)?;
                let (atime, mtime) = (c.u64()?, c.u64()?);
                c.skip(8)?;
                let (atimensec, mtimensec) = (c.u32()?, c.u32()?);
                c.skip(4)?;
                let mode = c.u32()?;
                c.skip(4)?;
                let (uid, gid) = (c.u32()?, c.u32()?);
                self.setattr(
                    nodeid,
                    valid,
                    fh,
                    size,
                    (atime, atimensec),
                    (mtime, mtimensec),
                    mode,
                    uid,
                    gid,
                )?;
                self.attr_out(nodeid, out)
            }
            FUSE_READLINK => {
                let mut buf = vec![0u8; 4096];
                // SAFETY: an empty path reads the link `fd` names; `buf` is writable for its length.
                let n = unsafe {
                    libc::readlinkat(
                        self.node(nodeid)?.as_raw_fd(),
                        c"".as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                };
                if n < 0 {
                    return Err(errno());
                }
                out.extend_from_slice(&buf[..n as usize]);
                Ok(())
            }
            FUSE_SYMLINK => {
                let name = c.name()?;
                let target = c.bytes()?;
                // SAFETY: both are valid C strings.
                check(unsafe { libc::symlinkat(target.as_ptr(), self.node(nodeid)?.as_raw_fd(), name.as_ptr()) })?;
                self.chown_new(nodeid, &name, caller)?;
                self.entry(nodeid, &name, out)
            }
            FUSE_MKDIR => {
                let mode = c.u32()?;
                let umask = c.u32()?;
                let name = c.name()?;
                // SAFETY: `name` is a valid C string.
                check(unsafe { libc::mkdirat(self.node(nodeid)?.as_raw_fd(), name.as_ptr(), mode & !umask & 0o7777) })?;
                self.chown_new(nodeid, &name, caller)?;
                self.entry(nodeid, &name, out)
            }
            FUSE_UNLINK | FUSE_RMDIR => {
                let name = c.name()?;
                let flags = if opcode == FUSE_RMDIR { libc::AT_REMOVEDIR } else { 0 };
                // SAFETY: `name` is a valid C string.
                check(unsafe { libc::unlinkat(self.node(nodeid)?.as_raw_fd(), name.as_ptr(), flags) })
            }
            FUSE_RENAME | FUSE_RENAME2 => {
                let newdir = c.u64()?;
                let flags = if opcode == FUSE_RENAME2 {
                    let f = c.u32()?;
                    c.skip(4)?;
                    f
                } else {
                    0
                };
                let old = c.name()?;
                let new = c.name()?;
                // SAFETY: both names are valid C strings; both descriptors are open directories.
                check(unsafe {
                    libc::renameat2(
                        self.node(nodeid)?.as_raw_fd(),
                        old.as_ptr(),
                        self.node(newdir)?.as_raw_fd(),
                        new.as_ptr(),
                        flags,
                    )
                })
            }
            FUSE_OPEN => {
                let flags = c.u32()? as i32;
                let node = self.node(nodeid)?;
                if stat_fd(node)?.st_mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(libc::EINVAL);
                }
                let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC;
                let file = File::from(reopen(node, flags & keep)?);
                let fh = self.add_handle(Handle::File(file))?;
                out.extend_from_slice(&fh.to_le_bytes());
                out.extend_from_slice(&[0u8; 8]);
                Ok(())
            }
            FUSE_CREATE => {
                let flags = c.u32()? as i32;
                let mode = c.u32()?;
                let umask = c.u32()?;
                c.skip(4)?;
                let name = c.name()?;
                let keep = libc::O_ACCMODE | libc::O_APPEND | libc::O_TRUNC | libc::O_EXCL;
                // SAFETY: `name` is a valid C string.
                let fd = unsafe {
                    libc::openat(
                        self.node(nodeid)?.as_raw_fd(),
                        name.as_ptr(),
                        (flags & keep) | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                        (mode & !umask & 0o7777) as libc::c_uint,
                    )
                };
                if fd < 0 {
                    return Err(errno());
                }
                // SAFETY: the kernel just returned this descriptor, which nothing else owns.
                let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
                self.chown_new(nodeid, &name, caller)?;
                self.entry(nodeid, &name, out)?;
                let fh = self.add_handle(Handle::File(file))?;
                out.extend_from_slice(&fh.to_le_bytes());
                out.extend_from_slice(&[0u8; 8]);
                Ok(())
            }
            FUSE_READ => {
                let fh = c.u64()?;
                let offset = c.u64()?;
                let size = c.u32()?.min(MAX_WRITE) as usize;
                let file = self.file(fh)?;
                let start = out.len();
                out.resize(start + size, 0);
                let n = file.read_at(&mut out[start..], offset).map_err(io_errno)?;
                out.truncate(start + n);
                Ok(())
            }
            FUSE_WRITE => {
                let fh = c.u64()?;
                let offset = c.u64()?;
                let size = c.u32()? as usize;
                c.skip(4 + 8 + 8)?;
                let data = c.data.get(..size).ok_or(libc::EINVAL)?;
                let n = self.file(fh)?.write_at(data, offset).map_err(io_errno)?;
                out.extend_from_slice(&(n as u32).to_le_bytes());
                out.extend_from_slice(&[0u8; 4]);
                Ok(())
            }
            FUSE_FSYNC => {
                let fh = c.u64()?;
                self.file(fh)?.sync_all().map_err(io_errno)
            }
            FUSE_RELEASE | FUSE_RELEASEDIR => {
                let fh = c.u64()?;
                self.handles.remove(&fh);
                Ok(())
            }
            FUSE_FSYNCDIR => Ok(()),
            FUSE_OPENDIR => {
                let node = self.node(nodeid)?;
                if stat_fd(node)?.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    return Err(libc::ENOTDIR);
                }
                let dir = reopen(node, libc::O_RDONLY | libc::O_DIRECTORY)?;
                let entries = read_dir(dir.as_fd())?;
                let fh = self.add_handle(Handle::Dir(entries))?;
                out.extend_from_slice(&fh.to_le_bytes());
                out.extend_from_slice(&[0u8; 8]);
                Ok(())
            }
            FUSE_READDIR => {
                let fh = c.u64()?;
                let offset = c.u64()? as usize;
                let size = c.u32()? as usize;
                let Some(Handle::Dir(entries)) = self.handles.get(&fh) else {
                    return Err(libc::EBADF);
                };
                let start = out.len();
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset) {
                    let rec = (24 + name.len()).div_ceil(8) * 8;
                    if out.len() - start + rec > size {
                        break;
                    }
                    out.extend_from_slice(&ino.to_le_bytes());
                    out.extend_from_slice(&((i + 1) as u64).to_le_bytes());
                    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
                    out.extend_from_slice(&kind.to_le_bytes());
                    out.extend_from_slice(name);
                    out.resize(out.len() + (rec - 24 - name.len()), 0);
                }
                Ok(())
            }
            FUSE_STATFS => {
                // SAFETY: `statvfs` is plain data; the kernel fills it in.
                let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
                // SAFETY: `s` is writable.
                check(unsafe { libc::fstatvfs(self.node(ROOT)?.as_raw_fd(), &mut s) })?;
                for v in [s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                for v in [s.f_bsize as u32, 255, s.f_frsize as u32, 0] {
                    out.extend_from_slice(&v.to_le_bytes());
                }
                out.extend_from_slice(&[0u8; 24]);
                Ok(())
            }
            // No devices, FIFOs or hard links in volumes; no extended attributes, locks or
            // other requests (ENOSYS tells the kernel not to ask again where it can).
            8 | 13 => Err(libc::EPERM),
            _ => Err(libc::ENOSYS),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &self,
        nodeid: u64,
        valid: u32,
        fh: u64,
        size: u64,
        atime: (u64, u32),
        mtime: (u64, u32),
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(), i32> {
        let node = self.node(nodeid)?;
        let is_link = stat_fd(node)?.st_mode & libc::S_IFMT == libc::S_IFLNK;
        if valid & (FATTR_UID | FATTR_GID) != 0 {
            let uid = if valid & FATTR_UID != 0 { uid } else { u32::MAX };
            let gid = if valid & FATTR_GID != 0 { gid } else { u32::MAX };
            // SAFETY: an empty C string with AT_EMPTY_PATH acts on the node itself.
            check(unsafe { libc::fchownat(node.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) })?;
        }
        if is_link && valid & (FATTR_MODE | FATTR_SIZE | FATTR_ATIME | FATTR_MTIME) != 0 {
            return Err(libc::EPERM);
        }
        if valid & FATTR_MODE != 0 {
            let link = format!("/proc/self/fd/{}", node.as_raw_fd());
            std::fs::set_permissions(link, std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))
                .map_err(io_errno)?;
        }
        if valid & FATTR_SIZE != 0 {
            match (valid & FATTR_FH != 0).then(|| self.file(fh)).transpose()? {
                Some(file) => file.set_len(size).map_err(io_errno)?,
                None => {
                    if stat_fd(node)?.st_mode & libc::S_IFMT != libc::S_IFREG {
                        return Err(libc::EINVAL);
                    }
                    File::from(reopen(node, libc::O_WRONLY)?)
                        .set_len(size)
                        .map_err(io_errno)?
                }
            }
        }
        if valid & (FATTR_ATIME | FATTR_MTIME) != 0 {
            let spec = |set: bool, now: bool, (secs, nsec): (u64, u32)| libc::timespec {
                tv_sec: if set && !now { secs as libc::time_t } else { 0 },
                tv_nsec: if !set {
                    libc::UTIME_OMIT
                } else if now {
                    libc::UTIME_NOW
                } else {
                    nsec as libc::c_long
                },
            };
            let times = [
                spec(valid & FATTR_ATIME != 0, valid & FATTR_ATIME_NOW != 0, atime),
                spec(valid & FATTR_MTIME != 0, valid & FATTR_MTIME_NOW != 0, mtime),
            ];
            let link = CString::new(format!("/proc/self/fd/{}", node.as_raw_fd())).expect("no NUL");
            // SAFETY: `link` is a valid C string and `times` two valid timespecs.
            check(unsafe { libc::utimensat(libc::AT_FDCWD, link.as_ptr(), times.as_ptr(), 0) })?;
        }
        Ok(())
    }
}

/// A directory's entries with `.` and `..` first: `(inode, DT_* type, name)`.
fn read_dir(dir: BorrowedFd<'_>) -> Result<Vec<(u64, u32, Vec<u8>)>, i32> {
    use std::os::unix::ffi::OsStrExt as _;
    use std::os::unix::fs::{DirEntryExt as _, FileTypeExt as _};
    let mut out = vec![
        (1, libc::DT_DIR as u32, b".".to_vec()),
        (1, libc::DT_DIR as u32, b"..".to_vec()),
    ];
    let entries = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())).map_err(io_errno)?;
    for e in entries {
        let e = e.map_err(io_errno)?;
        let kind = match e.file_type() {
            Ok(t) if t.is_dir() => libc::DT_DIR,
            Ok(t) if t.is_file() => libc::DT_REG,
            Ok(t) if t.is_symlink() => libc::DT_LNK,
            Ok(t) if t.is_fifo() => libc::DT_FIFO,
            _ => libc::DT_UNKNOWN,
        };
        out.push((e.ino(), kind as u32, e.file_name().as_bytes().to_vec()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
