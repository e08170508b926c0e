//! The ISO library of a [`DirPool`]: `isos/<name>.iso`, each with the sidecar
//! `isos/<name>.iso.json` holding its size and SHA-256.
//!
//! Invariants: an ISO is added complete or not at all (written under a temporary name, checked
//! for an ISO 9660 or UDF volume descriptor and against the expected SHA-256 if one was given,
//! its sidecar written, then linked into place); the sidecar is written before the ISO appears,
//! and one whose ISO is gone is removed when the pool opens; a listed ISO whose sidecar is missing
//! or whose size changed (a file an operator copied in) gets its checksum computed again.

use std::path::{Path, PathBuf};

use crate::name::{self, NameError};
use crate::pool::{self, copy_hashing, is_regular_file, CopyError, SourceError, ISOS};
use crate::{DirPool, ErrorKind, IoError};

/// The largest ISO accepted: 64 GiB.
pub const MAX_ISO_SIZE: u64 = 64 << 30;

/// An ISO of the library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsoInfo {
    /// Its name.
    pub name: String,
    /// Its length in bytes.
    pub size: u64,
    /// Its SHA-256, in hex.
    pub sha256: String,
    /// Its file, to attach to a VM.
    pub path: PathBuf,
}

/// Why adding an ISO failed. Nothing of it is left in the pool.
#[derive(Debug, thiserror::Error)]
pub enum IsoAddError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The source path is unusable.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The expected checksum is not 64 hex digits.
    #[error("the expected SHA-256 '{0}' is not 64 hexadecimal digits")]
    BadChecksum(String),
    /// The name is taken.
    #[error("an ISO named '{0}' already exists; choose another name or delete it first")]
    Exists(String),
    /// The bytes are not what the client announced.
    #[error("the ISO's SHA-256 is {actual}, not the expected {expected}; it was discarded, send it again")]
    ChecksumMismatch {
        /// What the client said.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// Not an ISO 9660 or UDF image.
    #[error("the file is not an ISO 9660 or UDF image (no volume descriptor at byte 32769)")]
    NotIso,
    /// Too many bytes.
    #[error("the ISO is larger than {0} bytes")]
    TooLarge(u64),
    /// Reading the client's stream failed.
    #[error("the upload broke off: {0}")]
    Body(std::io::Error),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl IsoAddError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            IsoAddError::Source(e) => e.kind(),
            IsoAddError::Exists(_) => ErrorKind::Conflict,
            IsoAddError::Io(_) => ErrorKind::Internal,
            _ => ErrorKind::BadRequest,
        }
    }
}

/// Why an ISO could not be found or deleted.
#[derive(Debug, thiserror::Error)]
pub enum IsoError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such ISO.
    #[error("no ISO named '{0}' in the library")]
    NotFound(String),
    /// The caller says it is in use.
    #[error("ISO '{name}' is in use by {user}; eject it first")]
    InUse {
        /// The ISO.
        name: String,
        /// Who uses it, as the caller described it.
        user: String,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl IsoError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            IsoError::Name(_) => ErrorKind::BadRequest,
            IsoError::NotFound(_) => ErrorKind::NotFound,
            IsoError::InUse { .. } => ErrorKind::Conflict,
            IsoError::Io(_) => ErrorKind::Internal,
        }
    }
}

/// Whether `header` (at least the first 32774 bytes of a file) has an ISO 9660 (`CD001`) or
/// UDF (`BEA01`, `NSR0x`) volume descriptor at byte 32769.
pub fn has_volume_descriptor(header: &[u8]) -> bool {
    let Some(id) = header.get(0x8001..0x8006) else {
        return false;
    };
    id == b"CD001" || id == b"BEA01" || id == b"NSR02" || id == b"NSR03"
}

impl DirPool {
    fn iso_file(&self, name: &str) -> PathBuf {
        self.dir(ISOS).join(format!("{name}.iso"))
    }

    fn sidecar(&self, name: &str) -> PathBuf {
        self.dir(ISOS).join(format!("{name}.iso.json"))
    }

    /// Adds the ISO at the local path `source`, checking `expected_sha256` when given.
    pub async fn add_iso_from_path(
        &self,
        name: &str,
        source: &Path,
        expected_sha256: Option<&str>,
    ) -> Result<IsoInfo, IsoAddError> {
        name::check(name)?;
        pool::check_source(source)?;
        let mut file = tokio::fs::File::open(source)
            .await
            .map_err(|e| SourceError::Unreadable(source.into(), e.to_string()))?;
        self.add_iso(name, &mut file, expected_sha256).await
    }

    /// Adds the ISO arriving on `body`, checking `expected_sha256` when given.
    pub async fn add_iso(
        &self,
        name: &str,
        body: &mut (impl tokio::io::AsyncRead + Unpin),
        expected_sha256: Option<&str>,
    ) -> Result<IsoInfo, IsoAddError> {
        name::check(name)?;
        let expected = match expected_sha256 {
            Some(text) => Some(crate::parse_sha256(text).ok_or_else(|| IsoAddError::BadChecksum(text.into()))?),
            None => None,
        };
        let dest = self.iso_file(name);
        if is_regular_file(&dest) {
            return Err(IsoAddError::Exists(name.into()));
        }
        let temp = self.temp(ISOS, name, "iso");
        let (actual, size) = copy_hashing(body, &temp.path, MAX_ISO_SIZE)
            .await
            .map_err(|e| match e {
                CopyError::Body(e) => IsoAddError::Body(e),
                CopyError::TooLarge(limit) => IsoAddError::TooLarge(limit),
                CopyError::Io(e) => IsoAddError::Io(e),
            })?;
        if let Some(expected) = expected {
            if actual != expected {
                return Err(IsoAddError::ChecksumMismatch {
                    expected: hex::encode(expected),
                    actual: hex::encode(actual),
                });
            }
        }
        let mut header = vec![0u8; 0x8006];
        let read =
            std::fs::File::open(&temp.path).and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut header, 0));
        if read.is_err() || !has_volume_descriptor(&header) {
            return Err(IsoAddError::NotIso);
        }
        let sha256 = hex::encode(actual);
        let _commit = self.commit.lock().await;
        if is_regular_file(&dest) {
            return Err(IsoAddError::Exists(name.into()));
        }
        self.write_sidecar(name, size, &sha256)?;
        if let Err(e) = temp.publish(&dest) {
            pool::remove_any(&self.sidecar(name));
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                return Err(IsoAddError::Exists(name.into()));
            }
            return Err(IoError::with(format!("creating {}", dest.display()))(e).into());
        }
        Ok(IsoInfo {
            name: name.into(),
            size,
            sha256,
            path: dest,
        })
    }

    fn write_sidecar(&self, name: &str, size: u64, sha256: &str) -> Result<(), IoError> {
        let path = self.sidecar(name);
        let temp = self.temp(ISOS, name, "json");
        let body = serde_json::json!({ "size": size, "sha256": sha256 }).to_string();
        std::fs::write(&temp.path, body).map_err(IoError::with(format!("writing {}", temp.path.display())))?;
        temp.replace(&path)
            .map_err(IoError::with(format!("writing {}", path.display())))
    }

    fn read_sidecar(&self, name: &str) -> Option<(u64, String)> {
        let text = std::fs::read(self.sidecar(name)).ok()?;
        let value: serde_json::Value = serde_json::from_slice(&text).ok()?;
        let size = value.get("size")?.as_u64()?;
        let sha256 = value.get("sha256")?.as_str()?;
        crate::parse_sha256(sha256)?;
        Some((size, sha256.to_owned()))
    }

    /// One ISO of the library.
    pub async fn iso(&self, name: &str) -> Result<IsoInfo, IsoError> {
        name::check(name)?;
        let path = self.iso_file(name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_file() => m,
            _ => return Err(IsoError::NotFound(name.into())),
        };
        let (size, sha256) = match self.read_sidecar(name) {
            Some((size, sha256)) if size == meta.len() => (size, sha256),
            _ => {
                let hashed = path.clone();
                let (size, sha256) = tokio::task::spawn_blocking(move || hash_file(&hashed))
                    .await
                    .map_err(|e| IoError::with(format!("hashing {}", path.display()))(std::io::Error::other(e)))?
                    .map_err(IoError::with(format!("hashing {}", path.display())))?;
                self.write_sidecar(name, size, &sha256)?;
                (size, sha256)
            }
        };
        Ok(IsoInfo {
            name: name.into(),
            size,
            sha256,
            path,
        })
    }

    /// The ISOs of the library, sorted by name.
    pub async fn list_isos(&self) -> Result<Vec<IsoInfo>, IsoError> {
        let dir = self.dir(ISOS);
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(IoError::with(format!("reading {}", dir.display())))? {
            let entry = entry.map_err(IoError::with(format!("reading {}", dir.display())))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file_name.strip_suffix(".iso") {
                if name::check(name).is_ok() {
                    names.push(name.to_owned());
                }
            }
        }
        names.sort();
        let mut isos = Vec::new();
        for name in names {
            match self.iso(&name).await {
                Ok(iso) => isos.push(iso),
                Err(IsoError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(isos)
    }

    /// Deletes an ISO unless `in_use` names a user of it.
    pub async fn delete_iso(&self, name: &str, in_use: impl Fn(&str) -> Option<String>) -> Result<(), IsoError> {
        name::check(name)?;
        let _commit = self.commit.lock().await;
        let path = self.iso_file(name);
        if !is_regular_file(&path) {
            return Err(IsoError::NotFound(name.into()));
        }
        if let Some(user) = in_use(name) {
            return Err(IsoError::InUse {
                name: name.into(),
                user,
            });
        }
        std::fs::remove_file(&path).map_err(IoError::with(format!("deleting {}", path.display())))?;
        pool::remove_any(&self.sidecar(name));
        Ok(())
    }
}

fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buffer[..n]);
    }
    Ok((size, hex::encode(hasher.finalize())))
}
