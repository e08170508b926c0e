//! File operations inside one volume's directory, for the volume content API.
//!
//! Invariants:
//! - a client's path never leaves the volume: it is split into components (`..` refused, `.` and
//!   empty ones dropped) and resolved with `openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)`
//!   from a descriptor of the volume's directory, so `..` and symlinks (which sandboxes mounting
//!   the volume may create) resolve as if the volume were `/`;
//! - the last component is acted on without following it (stat, remove, metadata), through its
//!   parent's descriptor;
//! - a written file appears whole or not at all: it is written under a temporary name in its
//!   directory and renamed into place (`RENAME_NOREPLACE` unless the client forces an overwrite).

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use viv_api::volumes::VolumeEntryStat;

/// Deepest directory tree walked by a listing or a removal.
const MAX_DEPTH: usize = 256;
/// Most entries one listing returns.
const MAX_ENTRIES: usize = 100_000;
/// Prefix of the temporary names uploads are written under.
pub const UPLOAD_PREFIX: &str = ".viv-upload-";

/// A failed volume file operation.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The path is not acceptable.
    #[error("{0}")]
    BadPath(String),
    /// Nothing at the path (or a parent is missing).
    #[error("path '{0}' not found")]
    NotFound(String),
    /// Something already is at the path.
    #[error("path '{0}' already exists")]
    Exists(String),
    /// The operation does not apply to what is at the path.
    #[error("{0}")]
    Invalid(String),
    /// Another I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

impl FsError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// The error of a failed system call on `path`, by its errno.
    fn from_errno(path: &VolPath, what: &str, err: io::Error) -> Self {
        match err.raw_os_error() {
            Some(libc::ENOENT) => Self::NotFound(path.display()),
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Self::Exists(path.display()),
            Some(libc::ENOTDIR) => Self::Invalid(format!("a parent of '{}' is not a directory", path.display())),
            Some(libc::EISDIR) => Self::Invalid(format!("'{}' is a directory", path.display())),
            Some(libc::ELOOP) => Self::Invalid(format!("too many symbolic links resolving '{}'", path.display())),
            Some(libc::ENAMETOOLONG) => Self::BadPath(format!("'{}' is too long", path.display())),
            Some(libc::EXDEV) => Self::BadPath(format!("'{}' leads out of the volume", path.display())),
            _ => Self::io(format!("{what} '{}'", path.display()), err),
        }
    }
}

/// A path inside a volume, split into checked components (empty for the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolPath {
    parts: Vec<String>,
}

impl VolPath {
    /// Checks a client's path: absolute or relative to the volume's root, no `..`, no NUL, at
    /// most 4096 bytes and 255 per component.
    pub fn parse(path: &str) -> Result<Self, FsError> {
        if path.len() > 4096 {
            return Err(FsError::BadPath("the path is longer than 4096 bytes".into()));
        }
        if path.contains('\0') {
            return Err(FsError::BadPath("the path contains a NUL byte".into()));
        }
        let mut parts = Vec::new();
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    return Err(FsError::BadPath(format!(
                        "'{path}': '..' is not allowed in volume paths"
                    )))
                }
                p if p.len() > 255 => {
                    return Err(FsError::BadPath(format!(
                        "'{path}': a component is longer than 255 bytes"
                    )))
                }
                p => parts.push(p.to_owned()),
            }
        }
        Ok(Self { parts })
    }

    /// `/a/b` (`/` for the root).
    pub fn display(&self) -> String {
        format!("/{}", self.parts.join("/"))
    }

    fn is_root(&self) -> bool {
        self.parts.is_empty()
    }

    fn name(&self) -> &str {
        self.parts.last().map(String::as_str).unwrap_or("")
    }

    fn parent(&self) -> Self {
        Self {
            parts: self.parts[..self.parts.len().saturating_sub(1)].to_vec(),
        }
    }

    fn child(&self, name: &str) -> Self {
        let mut parts = self.parts.clone();
        parts.push(name.to_owned());
        Self { parts }
    }

    /// The path relative to the root, for `openat2` (`.` for the root).
    fn relative(&self) -> CString {
        let rel = if self.parts.is_empty() {
            ".".to_owned()
        } else {
            self.parts.join("/")
        };
        CString::new(rel).expect("components hold no NUL")
    }
}

fn cstr(name: &str) -> CString {
    CString::new(name).expect("components hold no NUL")
}

/// Owner and mode to give an entry (absent fields are left as they are).
#[derive(Debug, Clone, Copy, Default)]
pub struct Meta {
    /// Owner.
    pub uid: Option<u32>,
    /// Group.
    pub gid: Option<u32>,
    /// Permission bits.
    pub mode: Option<u32>,
}

/// One volume's directory, held open.
#[derive(Debug)]
pub struct VolumeDir {
    root: OwnedFd,
}

/// `openat2` beneath `dir`, retrying when a concurrent rename made the kernel give up.
fn openat2(dir: BorrowedFd<'_>, rel: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `open_how` is a plain C struct of integers; all zeroes is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = if flags & libc::O_CREAT != 0 { u64::from(mode) } else { 0 };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    loop {
        // SAFETY: `rel` is a valid C string and `how` a valid `open_how` of the size passed; the
        // kernel writes nothing through either.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                rel.as_ptr(),
                &how as *const libc::open_how,
                std::mem::size_of::<libc::open_how>(),
            )
        };
        if fd >= 0 {
            // SAFETY: the kernel just returned this descriptor, which nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => continue,
            _ => return Err(err),
        }
    }
}

/// `openat` of a single name in `dir`, never following a symlink there.
fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid C string; the call writes nothing through it.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor, which nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat`; an empty name stats `dir` itself.
fn statat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<libc::stat> {
    // SAFETY: `stat` is plain data, all zeroes valid; the kernel fills it in.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let flags = if name.is_empty() {
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW
    } else {
        libc::AT_SYMLINK_NOFOLLOW
    };
    // SAFETY: `name` is a valid C string and `st` a valid, writable `stat`.
    let rc = unsafe { libc::fstatat(dir.as_raw_fd(), name.as_ptr(), &mut st, flags) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<String> {
    let mut buf = vec![0u8; 4096];
    // SAFETY: `buf` is writable for its length, `name` a valid C string.
    let n = unsafe { libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(n as usize);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> io::Result<()> {
    // SAFETY: `name` is a valid C string.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn time(secs: i64, nanos: i64) -> String {
    let t = UNIX_EPOCH + Duration::new(secs.max(0) as u64, nanos.clamp(0, 999_999_999) as u32);
    humantime::format_rfc3339_nanos(t).to_string()
}

fn entry(path: &VolPath, st: &libc::stat, target: Option<String>) -> VolumeEntryStat {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => "directory",
        libc::S_IFREG => "file",
        libc::S_IFLNK => "symlink",
        _ => "unknown",
    };
    VolumeEntryStat {
        name: path.name().to_owned(),
        kind: kind.into(),
        path: path.display(),
        size: st.st_size.max(0) as u64,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        target,
    }
}

/// Applies owner and mode to the entry `fd` (an `O_PATH` descriptor) refers to.
fn apply_meta(fd: BorrowedFd<'_>, meta: Meta) -> io::Result<()> {
    if meta.uid.is_some() || meta.gid.is_some() {
        let uid = meta.uid.unwrap_or(u32::MAX);
        let gid = meta.gid.unwrap_or(u32::MAX);
        // SAFETY: an empty C string with AT_EMPTY_PATH acts on `fd` itself; -1 (u32::MAX) keeps
        // an id unchanged.
        let rc = unsafe { libc::fchownat(fd.as_raw_fd(), c"".as_ptr(), uid, gid, libc::AT_EMPTY_PATH) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    if let Some(mode) = meta.mode {
        // An O_PATH descriptor takes no fchmod; its /proc link names exactly its inode.
        let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
        std::fs::set_permissions(link, std::os::unix::fs::PermissionsExt::from_mode(mode & 0o7777))?;
    }
    Ok(())
}

/// Removes the directory `name` in `parent` and everything in it.
fn remove_tree(parent: BorrowedFd<'_>, name: &CStr, depth: usize) -> io::Result<()> {
    if depth > MAX_DEPTH {
        return Err(io::Error::other(format!(
            "the tree is deeper than {MAX_DEPTH} directories"
        )));
    }
    let dir = openat(parent, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    for child in read_names(dir.as_fd())? {
        let child = cstr(&child);
        match unlinkat(dir.as_fd(), &child, 0) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => remove_tree(dir.as_fd(), &child, depth + 1)?,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    unlinkat(parent, name, libc::AT_REMOVEDIR)
}

/// The names in the directory `dir` (without `.` and `..`).
fn read_names(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for e in std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))? {
        let name = e?.file_name();
        match name.to_str() {
            Some(n) => names.push(n.to_owned()),
            // Names that are not UTF-8 cannot be named through the API; leave them.
            None => continue,
        }
    }
    names.sort();
    Ok(names)
}

impl VolumeDir {
    /// Opens a volume's directory.
    pub fn open(dir: &Path) -> Result<Self, FsError> {
        let c = CString::new(dir.as_os_str().as_encoded_bytes())
            .map_err(|_| FsError::Invalid("the volume directory's path holds a NUL".into()))?;
        // SAFETY: `c` is a valid C string.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(FsError::io(
                format!("opening the volume directory {}", dir.display()),
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: the kernel just returned this descriptor, which nothing else owns.
        let root = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Self { root })
    }

    /// The volume's directory.
    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// The directory at `path` (resolved beneath the root), as an `O_PATH` descriptor.
    fn dir(&self, path: &VolPath) -> Result<OwnedFd, FsError> {
        openat2(self.root.as_fd(), &path.relative(), libc::O_PATH | libc::O_DIRECTORY, 0)
            .map_err(|e| FsError::from_errno(path, "opening", e))
    }

    /// What is at `path`, not following a final symlink.
    pub fn stat(&self, path: &VolPath) -> Result<VolumeEntryStat, FsError> {
        if path.is_root() {
            let st = statat(self.root.as_fd(), c"").map_err(|e| FsError::from_errno(path, "reading", e))?;
            return Ok(entry(path, &st, None));
        }
        let parent = self.dir(&path.parent())?;
        self.stat_in(parent.as_fd(), path)
    }

    fn stat_in(&self, parent: BorrowedFd<'_>, path: &VolPath) -> Result<VolumeEntryStat, FsError> {
        let name = cstr(path.name());
        let st = statat(parent, &name).map_err(|e| FsError::from_errno(path, "reading", e))?;
        let target = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            readlinkat(parent, &name).ok()
        } else {
            None
        };
        Ok(entry(path, &st, target))
    }

    /// The entries of the directory at `path`, `depth` levels down (1: its children).
    pub fn list(&self, path: &VolPath, depth: usize) -> Result<Vec<VolumeEntryStat>, FsError> {
        let dir = openat2(
            self.root.as_fd(),
            &path.relative(),
            libc::O_RDONLY | libc::O_DIRECTORY,
            0,
        )
        .map_err(|e| FsError::from_errno(path, "opening", e))?;
        let mut out = Vec::new();
        self.list_into(dir.as_fd(), path, depth.clamp(1, MAX_DEPTH), &mut out)?;
        Ok(out)
    }

    fn list_into(
        &self,
        dir: BorrowedFd<'_>,
        path: &VolPath,
        depth: usize,
        out: &mut Vec<VolumeEntryStat>,
    ) -> Result<(), FsError> {
        let names = read_names(dir).map_err(|e| FsError::from_errno(path, "listing", e))?;
        for name in names {
            if out.len() >= MAX_ENTRIES {
                return Err(FsError::Invalid(format!(
                    "more than {MAX_ENTRIES} entries; list a smaller directory or less deep"
                )));
            }
            let child = path.child(&name);
            let stat = match self.stat_in(dir, &child) {
                Ok(stat) => stat,
                // Removed since the directory was read.
                Err(FsError::NotFound(_)) => continue,
                Err(e) => return Err(e),
            };
            let is_dir = stat.kind == "directory";
            out.push(stat);
            if is_dir && depth > 1 {
                if let Ok(sub) = openat(dir, &cstr(&name), libc::O_RDONLY | libc::O_DIRECTORY, 0) {
                    self.list_into(sub.as_fd(), &child, depth - 1, out)?;
                }
            }
        }
        Ok(())
    }

    /// Creates the directory at `path`; with `parents`, its missing parents too and an existing
    /// directory is no error.
    pub fn make_dir(&self, path: &VolPath, parents: bool, meta: Meta) -> Result<VolumeEntryStat, FsError> {
        if path.is_root() {
            return Err(FsError::Exists(path.display()));
        }
        let first = if parents { 1 } else { path.parts.len() };
        for end in first..=path.parts.len() {
            let here = VolPath {
                parts: path.parts[..end].to_vec(),
            };
            let parent = self.dir(&here.parent())?;
            let name = cstr(here.name());
            // SAFETY: `name` is a valid C string.
            if unsafe { libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) } < 0 {
                let err = io::Error::last_os_error();
                let last = end == path.parts.len();
                if err.raw_os_error() != Some(libc::EEXIST) || (last && !parents) {
                    return Err(FsError::from_errno(&here, "creating", err));
                }
                continue;
            }
            if end == path.parts.len() {
                let made = openat(parent.as_fd(), &name, libc::O_PATH | libc::O_DIRECTORY, 0)
                    .map_err(|e| FsError::from_errno(&here, "opening", e))?;
                let meta = Meta {
                    mode: Some(meta.mode.unwrap_or(0o755)),
                    ..meta
                };
                apply_meta(made.as_fd(), meta).map_err(|e| FsError::from_errno(&here, "setting metadata of", e))?;
            }
        }
        let st = self.stat(path)?;
        if st.kind != "directory" {
            return Err(FsError::Exists(path.display()));
        }
        Ok(st)
    }

    /// Opens the regular file at `path` for reading (symlinks followed, within the volume).
    pub fn open_file(&self, path: &VolPath) -> Result<(std::fs::File, u64), FsError> {
        let fd = openat2(
            self.root.as_fd(),
            &path.relative(),
            libc::O_RDONLY | libc::O_NONBLOCK,
            0,
        )
        .map_err(|e| FsError::from_errno(path, "opening", e))?;
        let st = statat(fd.as_fd(), c"").map_err(|e| FsError::from_errno(path, "reading", e))?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(FsError::Invalid(format!("'{}' is not a regular file", path.display())));
        }
        Ok((std::fs::File::from(fd), st.st_size.max(0) as u64))
    }

    /// Starts an upload to `path`: its parent (made with `parents`), and a new temporary file
    /// there to write to. Without `overwrite`, an existing entry is refused now (and again at
    /// [`Upload::commit`]).
    pub fn begin_upload(&self, path: &VolPath, parents: bool, overwrite: bool) -> Result<Upload, FsError> {
        if path.is_root() {
            return Err(FsError::Invalid("the volume's root is a directory".into()));
        }
        let parent_path = path.parent();
        if parents && !parent_path.is_root() {
            self.make_dir(&parent_path, true, Meta::default())?;
        }
        let parent = self.dir(&parent_path)?;
        let name = cstr(path.name());
        match statat(parent.as_fd(), &name) {
            Ok(st) if st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                return Err(FsError::Invalid(format!("'{}' is a directory", path.display())))
            }
            Ok(_) if !overwrite => return Err(FsError::Exists(path.display())),
            _ => {}
        }
        let temp = format!("{UPLOAD_PREFIX}{}", crate::manager::random_id(16));
        let file = openat(
            parent.as_fd(),
            &cstr(&temp),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
            0o600,
        )
        .map_err(|e| FsError::from_errno(path, "creating", e))?;
        Ok(Upload {
            parent,
            temp: cstr(&temp),
            name,
            path: path.clone(),
            overwrite,
            file: Some(std::fs::File::from(file)),
        })
    }

    /// Removes what is at `path`, directories with everything in them.
    pub fn remove(&self, path: &VolPath) -> Result<(), FsError> {
        if path.is_root() {
            return Err(FsError::Invalid("the volume's root cannot be removed".into()));
        }
        let parent = self.dir(&path.parent())?;
        let name = cstr(path.name());
        match unlinkat(parent.as_fd(), &name, 0) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EISDIR) => {
                remove_tree(parent.as_fd(), &name, 0).map_err(|e| FsError::from_errno(path, "removing", e))
            }
            Err(e) => Err(FsError::from_errno(path, "removing", e)),
        }
    }

    /// Changes owner and mode of what is at `path` (a final symlink itself: owner only).
    pub fn update_metadata(&self, path: &VolPath, meta: Meta) -> Result<VolumeEntryStat, FsError> {
        let target = if path.is_root() {
            openat2(self.root.as_fd(), c".", libc::O_PATH, 0)
        } else {
            let parent = self.dir(&path.parent())?;
            openat(parent.as_fd(), &cstr(path.name()), libc::O_PATH, 0)
        }
        .map_err(|e| FsError::from_errno(path, "opening", e))?;
        let st = statat(target.as_fd(), c"").map_err(|e| FsError::from_errno(path, "reading", e))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK && meta.mode.is_some() {
            return Err(FsError::Invalid(format!(
                "'{}' is a symlink, which has no mode",
                path.display()
            )));
        }
        apply_meta(target.as_fd(), meta).map_err(|e| FsError::from_errno(path, "setting metadata of", e))?;
        self.stat(path)
    }
}

/// A file being uploaded: written under a temporary name, renamed into place by
/// [`Upload::commit`]; dropped uncommitted, it leaves nothing.
#[derive(Debug)]
pub struct Upload {
    parent: OwnedFd,
    temp: CString,
    name: CString,
    path: VolPath,
    overwrite: bool,
    file: Option<std::fs::File>,
}

impl Upload {
    /// The file to write the content to.
    pub fn take_file(&mut self) -> std::fs::File {
        self.file.take().expect("the upload's file is taken once")
    }

    /// Gives the written file its metadata and moves it into place.
    pub fn commit(mut self, file: std::fs::File, meta: Meta) -> Result<VolumeEntryStat, FsError> {
        let path = self.path.clone();
        file.sync_all().map_err(|e| FsError::from_errno(&path, "writing", e))?;
        let meta = Meta {
            mode: Some(meta.mode.unwrap_or(0o644)),
            ..meta
        };
        apply_meta(file.as_fd(), meta).map_err(|e| FsError::from_errno(&path, "setting metadata of", e))?;
        drop(file);
        let flags = if self.overwrite { 0 } else { libc::RENAME_NOREPLACE };
        // SAFETY: both names are valid C strings; both descriptors are the open parent.
        let rc = unsafe {
            libc::renameat2(
                self.parent.as_raw_fd(),
                self.temp.as_ptr(),
                self.parent.as_raw_fd(),
                self.name.as_ptr(),
                flags,
            )
        };
        if rc < 0 {
            return Err(FsError::from_errno(
                &path,
                "moving into place",
                io::Error::last_os_error(),
            ));
        }
        self.temp = CString::default();
        let parent = self
            .parent
            .try_clone()
            .map_err(|e| FsError::io("duplicating a descriptor", e))?;
        let st = statat(parent.as_fd(), &self.name).map_err(|e| FsError::from_errno(&path, "reading", e))?;
        Ok(entry(&path, &st, None))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if !self.temp.is_empty() {
            let _ = unlinkat(self.parent.as_fd(), &self.temp, 0);
        }
    }
}

/// Seconds since the epoch of `t` (for tests).
#[cfg(test)]
fn epoch(t: &str) -> u64 {
    humantime::parse_rfc3339(t)
        .unwrap()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    fn scratch() -> (VolumeDir, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("viv-volfs-{}", crate::manager::random_id(10)));
        std::fs::create_dir_all(&dir).unwrap();
        (VolumeDir::open(&dir).unwrap(), dir)
    }

    fn p(s: &str) -> VolPath {
        VolPath::parse(s).unwrap()
    }

    fn write(vol: &VolumeDir, path: &str, data: &[u8], overwrite: bool) -> Result<VolumeEntryStat, FsError> {
        let mut up = vol.begin_upload(&p(path), true, overwrite)?;
        let mut f = up.take_file();
        f.write_all(data).unwrap();
        up.commit(f, Meta::default())
    }

    #[test]
    fn paths_are_normalized_and_dotdot_is_refused() {
        assert_eq!(p("/a//b/./c/").display(), "/a/b/c");
        assert_eq!(p("a/b").display(), "/a/b");
        assert_eq!(p("").display(), "/");
        assert!(matches!(VolPath::parse("/a/../b"), Err(FsError::BadPath(_))));
        assert!(matches!(VolPath::parse("a\0b"), Err(FsError::BadPath(_))));
        assert!(matches!(VolPath::parse(&"x".repeat(300)), Err(FsError::BadPath(_))));
    }

    #[test]
    fn symlinks_resolve_inside_the_volume() {
        let (vol, dir) = scratch();
        let outside = dir.with_extension("outside");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"host").unwrap();
        std::os::unix::fs::symlink(&outside, dir.join("escape")).unwrap();
        std::os::unix::fs::symlink("../../../..", dir.join("up")).unwrap();
        // The absolute target is taken inside the volume, where it does not exist.
        assert!(matches!(vol.open_file(&p("/escape/secret")), Err(FsError::NotFound(_))));
        assert!(matches!(
            vol.begin_upload(&p("/escape/new"), false, true),
            Err(FsError::NotFound(_))
        ));
        // `..` through a symlink stops at the volume's root.
        write(&vol, "/inside.txt", b"vol", false).unwrap();
        let (mut f, _) = vol.open_file(&p("/up/inside.txt")).unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "vol");
        // A final symlink is reported, not followed.
        let st = vol.stat(&p("/escape")).unwrap();
        assert_eq!(st.kind, "symlink");
        assert_eq!(st.target.as_deref(), Some(outside.to_str().unwrap()));
        // Removing it removes the link only.
        vol.remove(&p("/escape")).unwrap();
        assert!(outside.join("secret").exists());
        std::fs::remove_dir_all(&outside).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn uploads_replace_only_when_asked_and_leave_no_temporary_file() {
        let (vol, dir) = scratch();
        let st = write(&vol, "/d/e/f.txt", b"one", false).unwrap();
        assert_eq!(
            (st.kind.as_str(), st.size, st.mode, st.path.as_str()),
            ("file", 3, 0o644, "/d/e/f.txt")
        );
        assert!(epoch(&st.mtime) > 0);
        assert!(matches!(
            write(&vol, "/d/e/f.txt", b"two", false),
            Err(FsError::Exists(_))
        ));
        write(&vol, "/d/e/f.txt", b"three", true).unwrap();
        assert_eq!(std::fs::read(dir.join("d/e/f.txt")).unwrap(), b"three");
        // An upload dropped before its commit leaves nothing.
        let mut up = vol.begin_upload(&p("/d/g.txt"), false, false).unwrap();
        up.take_file().write_all(b"partial").unwrap();
        drop(up);
        let names: Vec<String> = vol.list(&p("/d"), 1).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec!["e".to_owned()]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn directories_list_remove_and_take_metadata() {
        let (vol, dir) = scratch();
        assert!(matches!(
            vol.make_dir(&p("/a/b"), false, Meta::default()),
            Err(FsError::NotFound(_))
        ));
        vol.make_dir(&p("/a/b"), true, Meta::default()).unwrap();
        assert!(matches!(
            vol.make_dir(&p("/a/b"), false, Meta::default()),
            Err(FsError::Exists(_))
        ));
        vol.make_dir(&p("/a/b"), true, Meta::default()).unwrap();
        write(&vol, "/a/b/c.txt", b"x", false).unwrap();
        let deep: Vec<String> = vol.list(&p("/"), 3).unwrap().into_iter().map(|e| e.path).collect();
        assert_eq!(deep, vec!["/a", "/a/b", "/a/b/c.txt"]);
        let st = vol
            .update_metadata(
                &p("/a/b/c.txt"),
                Meta {
                    uid: Some(1000),
                    gid: Some(1001),
                    mode: Some(0o600),
                },
            )
            .unwrap();
        assert_eq!((st.uid, st.gid, st.mode), (1000, 1001, 0o600));
        assert!(matches!(vol.list(&p("/a/b/c.txt"), 1), Err(FsError::Invalid(_))));
        assert!(matches!(vol.remove(&p("/")), Err(FsError::Invalid(_))));
        vol.remove(&p("/a")).unwrap();
        assert!(matches!(vol.stat(&p("/a")), Err(FsError::NotFound(_))));
        assert!(matches!(vol.remove(&p("/a")), Err(FsError::NotFound(_))));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
