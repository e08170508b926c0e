//! The directory pool: its layout, temporary files and how files are put into place.
//!
//! Layout: `<pool>/disks/<name>.qcow2|raw`, `<pool>/isos/<name>.iso` with the sidecar
//! `<name>.iso.json` (size and SHA-256), `<pool>/seeds/<name>.iso`.
//!
//! Invariants: files whose names start with a dot are temporaries of this process and are
//! removed when the pool opens (the pool belongs to one server process); a new file is made
//! under such a name and linked to its final name with a link that fails if the name is taken,
//! so nothing ever appears half-written or replaces another disk; symlinks are never followed
//! (a symlink in the pool is not a disk or an ISO); changes that depend on which disks exist
//! (publishing, deleting, wiping) hold [`DirPool`]'s commit lock, so a check such as "no disk
//! is backed by this one" stays true until the change is made.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::IoError;

/// A directory storage pool. Share it between tasks behind an `Arc`.
#[derive(Debug)]
pub struct DirPool {
    pub(crate) root: PathBuf,
    pub(crate) commit: tokio::sync::Mutex<()>,
}

/// Why a pool could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenPoolError {
    /// The path is not absolute.
    #[error("the pool path '{0}' is not absolute")]
    NotAbsolute(PathBuf),
    /// The path exists and is not a directory.
    #[error("the pool path '{0}' exists and is not a directory")]
    NotADirectory(PathBuf),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl OpenPoolError {
    /// How a server should report it.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            OpenPoolError::NotAbsolute(_) | OpenPoolError::NotADirectory(_) => crate::ErrorKind::BadRequest,
            OpenPoolError::Io(_) => crate::ErrorKind::Internal,
        }
    }
}

pub(crate) const DISKS: &str = "disks";
pub(crate) const ISOS: &str = "isos";
pub(crate) const SEEDS: &str = "seeds";

impl DirPool {
    /// Opens (creating when missing) the pool at `path`, removing temporaries left by an earlier
    /// process and ISO sidecars whose ISO is gone.
    pub fn open(path: impl AsRef<Path>) -> Result<DirPool, OpenPoolError> {
        let root = path.as_ref().to_path_buf();
        if !root.is_absolute() {
            return Err(OpenPoolError::NotAbsolute(root));
        }
        if root.exists() && !root.is_dir() {
            return Err(OpenPoolError::NotADirectory(root));
        }
        for sub in [DISKS, ISOS, SEEDS] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(IoError::with(format!("creating {}", dir.display())))?;
            for entry in fs::read_dir(&dir).map_err(IoError::with(format!("reading {}", dir.display())))? {
                let entry = entry.map_err(IoError::with(format!("reading {}", dir.display())))?;
                if entry.file_name().to_string_lossy().starts_with('.') {
                    remove_any(&entry.path());
                }
            }
        }
        let isos = root.join(ISOS);
        for entry in fs::read_dir(&isos).map_err(IoError::with(format!("reading {}", isos.display())))? {
            let entry = entry.map_err(IoError::with(format!("reading {}", isos.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(iso) = name.strip_suffix(".json") {
                if !isos.join(iso).exists() {
                    remove_any(&entry.path());
                }
            }
        }
        Ok(DirPool {
            root,
            commit: tokio::sync::Mutex::new(()),
        })
    }

    /// The pool's directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    pub(crate) fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// A fresh temporary path in `sub` for work on `name` (validated by the caller).
    pub(crate) fn temp(&self, sub: &str, name: &str, extension: &str) -> TempPath {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let file = format!(".tmp-{}-{n}-{name}.{extension}", std::process::id());
        TempPath {
            path: self.dir(sub).join(file),
        }
    }
}

/// A temporary file (or directory) removed when dropped unless published.
#[derive(Debug)]
pub(crate) struct TempPath {
    pub(crate) path: PathBuf,
}

impl TempPath {
    /// Syncs the file and links it to `dest`, failing with `AlreadyExists` when `dest` exists;
    /// the temporary name goes either way.
    pub(crate) fn publish(self, dest: &Path) -> std::io::Result<()> {
        fs::File::open(&self.path)?.sync_all()?;
        fs::hard_link(&self.path, dest)?;
        sync_parent(dest);
        Ok(())
    }

    /// Syncs the file and renames it over `dest`.
    pub(crate) fn replace(self, dest: &Path) -> std::io::Result<()> {
        fs::File::open(&self.path)?.sync_all()?;
        fs::rename(&self.path, dest)?;
        sync_parent(dest);
        Ok(())
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        remove_any(&self.path);
    }
}

fn sync_parent(path: &Path) {
    if let Some(parent) = path.parent() {
        if let Ok(dir) = fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
}

pub(crate) fn remove_any(path: &Path) {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(path);
        }
        Ok(_) => {
            let _ = fs::remove_file(path);
        }
        Err(_) => {}
    }
}

/// Whether `path` is a regular file (not a symlink).
pub(crate) fn is_regular_file(path: &Path) -> bool {
    fs::symlink_metadata(path)
        .map(|m| m.file_type().is_file())
        .unwrap_or(false)
}

/// Checks a local source path given by a user: absolute, and naming a regular file.
pub(crate) fn check_source(path: &Path) -> Result<(), SourceError> {
    if !path.is_absolute() {
        return Err(SourceError::NotAbsolute(path.to_path_buf()));
    }
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(SourceError::NotAFile(path.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SourceError::NotFound(path.to_path_buf())),
        Err(e) => Err(SourceError::Unreadable(path.to_path_buf(), e.to_string())),
    }
}

/// Why a local source file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// Relative path.
    #[error("the source path '{0}' must be absolute")]
    NotAbsolute(PathBuf),
    /// Missing.
    #[error("the source file '{0}' does not exist")]
    NotFound(PathBuf),
    /// A directory or device.
    #[error("the source '{0}' is not a regular file")]
    NotAFile(PathBuf),
    /// Not readable.
    #[error("the source '{0}' cannot be read: {1}")]
    Unreadable(PathBuf, String),
}

impl SourceError {
    /// How a server should report it.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            SourceError::NotFound(_) => crate::ErrorKind::NotFound,
            _ => crate::ErrorKind::BadRequest,
        }
    }
}

/// Why copying a byte stream into a temporary file failed.
#[derive(Debug)]
pub(crate) enum CopyError {
    /// Reading the stream failed (the client's side).
    Body(std::io::Error),
    /// More than the limit arrived.
    TooLarge(u64),
    /// Writing failed (the host's side).
    Io(IoError),
}

/// Copies `body` into a new file at `dest`, at most `limit` bytes, returning the SHA-256 and
/// the number of bytes.
pub(crate) async fn copy_hashing(
    body: &mut (impl tokio::io::AsyncRead + Unpin),
    dest: &Path,
    limit: u64,
) -> Result<([u8; 32], u64), CopyError> {
    use sha2::Digest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |e| CopyError::Io(IoError::with(format!("writing {}", dest.display()))(e));
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)
        .await
        .map_err(io)?;
    let mut hasher = sha2::Sha256::new();
    let mut total = 0u64;
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let n = body.read(&mut buffer).await.map_err(CopyError::Body)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > limit {
            return Err(CopyError::TooLarge(limit));
        }
        hasher.update(&buffer[..n]);
        file.write_all(&buffer[..n]).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    file.sync_all().await.map_err(io)?;
    Ok((hasher.finalize().into(), total))
}
