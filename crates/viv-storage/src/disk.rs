//! Disks of a [`DirPool`]: create, inspect, import, upload, download, resize, clone, wipe,
//! delete.
//!
//! Invariants:
//! - A disk is the regular file `disks/<name>.qcow2` or `disks/<name>.raw`; one name has at most
//!   one of them, and the extension is the format every `qemu-img` call is given.
//! - A linked clone's backing reference is the parent's bare file name (relative to `disks/`)
//!   with its format (`-F`); [`DirPool::disk_info`] refuses any other backing reference.
//! - A disk that backs another is never changed: resize, wipe and delete are refused, naming the
//!   child.
//! - Images from outside (import, upload) are probed once and must pass
//!   [`qemu_img::check_foreign`] before `qemu-img` reads their data; an upload's SHA-256 is
//!   checked before it is even probed. Whatever fails leaves no file behind.
//! - Resize is the one change made in place (by `qemu-img resize`, which updates the image's
//!   metadata); a disk used by a running VM is resized through QEMU (`block_resize`) instead.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::name::{self, NameError};
use crate::pool::{self, copy_hashing, is_regular_file, CopyError, SourceError, DISKS};
use crate::qemu_img::{self, ImageCheckError, InfoParseError, ToolError};
use crate::size::{check_disk_size, SizeError, MAX_DISK_SIZE};
use crate::{DirPool, ErrorKind, IoError};

mod copies;
mod export;
pub use export::{Export, ExportError, ExportFormat};

/// A disk's format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskFormat {
    /// QEMU's copy-on-write format (thin, supports backing files).
    Qcow2,
    /// A plain image (sparse where the file system allows).
    Raw,
}

impl DiskFormat {
    /// The `qemu-img` driver name, also the file extension.
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Qcow2 => "qcow2",
            DiskFormat::Raw => "raw",
        }
    }

    /// Parses `qcow2` or `raw`.
    pub fn parse(text: &str) -> Option<DiskFormat> {
        match text {
            "qcow2" => Some(DiskFormat::Qcow2),
            "raw" => Some(DiskFormat::Raw),
            _ => None,
        }
    }

    const ALL: [DiskFormat; 2] = [DiskFormat::Qcow2, DiskFormat::Raw];
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A disk as listed: no `qemu-img` call needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSummary {
    /// Its name.
    pub name: String,
    /// Its format.
    pub format: DiskFormat,
    /// The file's length in bytes (not the virtual size for qcow2).
    pub file_size: u64,
}

/// What `qemu-img info` says about a disk of the pool, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Its name.
    pub name: String,
    /// Its format.
    pub format: DiskFormat,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host.
    pub actual_size: Option<u64>,
    /// The disk it is a linked clone of.
    pub backing: Option<String>,
    /// Its file, to attach to a VM.
    pub path: PathBuf,
}

/// A disk opened for download.
#[derive(Debug)]
pub struct Download {
    /// The file, positioned at its start.
    pub file: tokio::fs::File,
    /// Its length in bytes.
    pub len: u64,
    /// Its format.
    pub format: DiskFormat,
}

/// Why creating a disk failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateDiskError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Impossible size.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// The name is taken.
    #[error("a disk named '{0}' already exists; choose another name or delete it first")]
    Exists(String),
    /// `qemu-img` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl CreateDiskError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CreateDiskError::Name(_) | CreateDiskError::Size(_) => ErrorKind::BadRequest,
            CreateDiskError::Exists(_) => ErrorKind::Conflict,
            CreateDiskError::Tool(_) | CreateDiskError::Io(_) => ErrorKind::Internal,
        }
    }
}

/// Why a disk could not be inspected.
#[derive(Debug, thiserror::Error)]
pub enum DiskInfoError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such disk.
    #[error("no disk named '{0}' in the pool")]
    NotFound(String),
    /// `qemu-img info` output was unusable.
    #[error("disk '{name}': {source}")]
    Parse {
        /// The disk.
        name: String,
        /// Why.
        #[source]
        source: InfoParseError,
    },
    /// The disk refers to a file that is not a disk of the pool.
    #[error("disk '{name}' refers to the backing file '{backing}', which is not a disk of this pool; it must not be used (delete it, or rebase it onto a pool disk)")]
    UnsafeBacking {
        /// The disk.
        name: String,
        /// Its backing reference.
        backing: String,
    },
    /// `qemu-img` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
}

impl DiskInfoError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DiskInfoError::Name(_) => ErrorKind::BadRequest,
            DiskInfoError::NotFound(_) => ErrorKind::NotFound,
            DiskInfoError::Parse { .. } | DiskInfoError::UnsafeBacking { .. } | DiskInfoError::Tool(_) => {
                ErrorKind::Internal
            }
        }
    }
}

/// Why importing a disk image failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The source path is unusable.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The name is taken.
    #[error("a disk named '{0}' already exists; choose another name or delete it first")]
    Exists(String),
    /// The image is refused.
    #[error("the image cannot be imported: {0}")]
    Refused(#[from] ImageCheckError),
    /// `qemu-img` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl ImportError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ImportError::Name(_) | ImportError::Refused(_) => ErrorKind::BadRequest,
            ImportError::Source(e) => e.kind(),
            ImportError::Exists(_) => ErrorKind::Conflict,
            ImportError::Tool(_) | ImportError::Io(_) => ErrorKind::Internal,
        }
    }
}

/// Why an upload failed. Nothing of it is left in the pool.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The expected checksum is not 64 hex digits.
    #[error("the expected SHA-256 '{0}' is not 64 hexadecimal digits")]
    BadChecksum(String),
    /// The name is taken.
    #[error("a disk named '{0}' already exists; choose another name or delete it first")]
    Exists(String),
    /// The bytes are not what the client announced.
    #[error("the upload's SHA-256 is {actual}, not the expected {expected}; the upload was discarded, send it again")]
    ChecksumMismatch {
        /// What the client said.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// Nothing arrived.
    #[error("the upload is empty")]
    Empty,
    /// Too many bytes.
    #[error("the upload is larger than {0} bytes, the largest disk allowed")]
    TooLarge(u64),
    /// A raw image that is not whole sectors.
    #[error("the upload is a raw image of {0} bytes, which is not a multiple of 512; pad it to whole sectors")]
    Unaligned(u64),
    /// Reading the client's stream failed.
    #[error("the upload broke off: {0}")]
    Body(std::io::Error),
    /// The image is refused.
    #[error("the uploaded image cannot be used: {0}")]
    Refused(#[from] ImageCheckError),
    /// `qemu-img` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl UploadError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            UploadError::Exists(_) => ErrorKind::Conflict,
            UploadError::Tool(_) | UploadError::Io(_) => ErrorKind::Internal,
            _ => ErrorKind::BadRequest,
        }
    }
}

/// Why a download could not start.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such disk.
    #[error("no disk named '{0}' in the pool")]
    NotFound(String),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl DownloadError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DownloadError::Name(_) => ErrorKind::BadRequest,
            DownloadError::NotFound(_) => ErrorKind::NotFound,
            DownloadError::Io(_) => ErrorKind::Internal,
        }
    }
}

/// Why a resize failed.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such disk.
    #[error("no disk named '{0}' in the pool")]
    NotFound(String),
    /// Impossible size.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// A shrink without `force`.
    #[error("disk '{name}' is {current} bytes; shrinking it to {requested} bytes loses the data beyond that point; repeat with force to do it anyway")]
    WouldShrink {
        /// The disk.
        name: String,
        /// Its size.
        current: u64,
        /// The size asked for.
        requested: u64,
    },
    /// Another disk is backed by it.
    #[error("disk '{name}' is the backing file of disk '{child}' and cannot change; delete the clone or make it a full clone first")]
    HasChildren {
        /// The disk.
        name: String,
        /// A disk backed by it.
        child: String,
    },
    /// Reading the disk failed.
    #[error(transparent)]
    Info(#[from] DiskInfoError),
    /// `qemu-img` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl ResizeError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ResizeError::Name(_) | ResizeError::Size(_) | ResizeError::WouldShrink { .. } => ErrorKind::BadRequest,
            ResizeError::NotFound(_) => ErrorKind::NotFound,
            ResizeError::HasChildren { .. } => ErrorKind::Conflict,
            ResizeError::Tool(e) if e.is_lock_conflict() => ErrorKind::Conflict,
            ResizeError::Info(e) => e.kind(),
            ResizeError::Tool(_) | ResizeError::Io(_) => ErrorKind::Internal,
        }
    }
}

/// Why a clone failed.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such source disk.
    #[error("no disk named '{0}' in the pool to clone")]
    SourceNotFound(String),
    /// The name is taken.
    #[error("a disk named '{0}' already exists; choose another name or delete it first")]
    Exists(String),
    /// The source disk was deleted while cloning.
    #[error("disk '{0}' was deleted while it was being cloned")]
    SourceGone(String),
    /// Reading the source failed.
    #[error(transparent)]
    Info(#[from] DiskInfoError),
    /// `qemu-img` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl CloneError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CloneError::Name(_) => ErrorKind::BadRequest,
            CloneError::SourceNotFound(_) => ErrorKind::NotFound,
            CloneError::Exists(_) | CloneError::SourceGone(_) => ErrorKind::Conflict,
            CloneError::Tool(e) if e.is_lock_conflict() => ErrorKind::Conflict,
            CloneError::Info(e) => e.kind(),
            CloneError::Tool(_) | CloneError::Io(_) => ErrorKind::Internal,
        }
    }
}

/// Why a wipe failed.
#[derive(Debug, thiserror::Error)]
pub enum WipeError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such disk.
    #[error("no disk named '{0}' in the pool")]
    NotFound(String),
    /// The caller says it is in use.
    #[error("disk '{name}' is in use by {user}; stop it first")]
    InUse {
        /// The disk.
        name: String,
        /// Who uses it, as the caller described it.
        user: String,
    },
    /// Another disk is backed by it.
    #[error("disk '{name}' is the backing file of disk '{child}'; wiping it would corrupt that clone, delete the clone first")]
    HasChildren {
        /// The disk.
        name: String,
        /// A disk backed by it.
        child: String,
    },
    /// Reading the disk failed.
    #[error(transparent)]
    Info(#[from] DiskInfoError),
    /// `qemu-img` failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl WipeError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            WipeError::Name(_) => ErrorKind::BadRequest,
            WipeError::NotFound(_) => ErrorKind::NotFound,
            WipeError::InUse { .. } | WipeError::HasChildren { .. } => ErrorKind::Conflict,
            WipeError::Info(e) => e.kind(),
            WipeError::Tool(_) | WipeError::Io(_) => ErrorKind::Internal,
        }
    }
}

/// Why a delete failed.
#[derive(Debug, thiserror::Error)]
pub enum DeleteDiskError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such disk.
    #[error("no disk named '{0}' in the pool")]
    NotFound(String),
    /// The caller says it is in use.
    #[error("disk '{name}' is in use by {user}; detach it or stop that first")]
    InUse {
        /// The disk.
        name: String,
        /// Who uses it, as the caller described it.
        user: String,
    },
    /// Another disk is backed by it.
    #[error("disk '{name}' is the backing file of disk '{child}'; delete that clone first")]
    HasChildren {
        /// The disk.
        name: String,
        /// A disk backed by it.
        child: String,
    },
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl DeleteDiskError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            DeleteDiskError::Name(_) => ErrorKind::BadRequest,
            DeleteDiskError::NotFound(_) => ErrorKind::NotFound,
            DeleteDiskError::InUse { .. } | DeleteDiskError::HasChildren { .. } => ErrorKind::Conflict,
            DeleteDiskError::Io(_) => ErrorKind::Internal,
        }
    }
}

impl DirPool {
    /// The path a disk has or would have.
    pub(crate) fn disk_path(&self, name: &str, format: DiskFormat) -> PathBuf {
        self.dir(DISKS).join(format!("{name}.{format}"))
    }

    /// Finds a disk by its (validated) name.
    fn find_disk(&self, name: &str) -> Option<(PathBuf, DiskFormat)> {
        DiskFormat::ALL
            .into_iter()
            .map(|format| (self.disk_path(name, format), format))
            .find(|(path, _)| is_regular_file(path))
    }

    fn disk_exists(&self, name: &str) -> bool {
        self.find_disk(name).is_some()
    }

    /// Links a finished temporary file into place as disk `name`, under the commit lock.
    /// `Ok(false)` when the name was taken meanwhile.
    async fn publish_disk(&self, temp: pool::TempPath, name: &str, format: DiskFormat) -> Result<bool, IoError> {
        let _commit = self.commit.lock().await;
        if self.disk_exists(name) {
            return Ok(false);
        }
        let dest = self.disk_path(name, format);
        match temp.publish(&dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(IoError::with(format!("creating {}", dest.display()))(e)),
        }
    }

    /// The disks of the pool, sorted by name.
    pub fn list_disks(&self) -> Result<Vec<DiskSummary>, IoError> {
        let dir = self.dir(DISKS);
        let mut disks = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(IoError::with(format!("reading {}", dir.display())))? {
            let entry = entry.map_err(IoError::with(format!("reading {}", dir.display())))?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some((name, format)) = split_disk_file_name(&file_name) else {
                continue;
            };
            let Ok(meta) = std::fs::symlink_metadata(entry.path()) else {
                continue;
            };
            if meta.file_type().is_file() {
                disks.push(DiskSummary {
                    name: name.to_owned(),
                    format,
                    file_size: meta.len(),
                });
            }
        }
        disks.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(disks)
    }

    /// The disks whose backing file is disk `name`.
    pub fn disk_children(&self, name: &str) -> Result<Vec<String>, IoError> {
        let Some((path, _)) = self.find_disk(name) else {
            return Ok(Vec::new());
        };
        let file_name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut children = Vec::new();
        for disk in self.list_disks()? {
            if disk.format != DiskFormat::Qcow2 || disk.name == name {
                continue;
            }
            let child = self.disk_path(&disk.name, DiskFormat::Qcow2);
            match crate::backing::read_backing_name(&child) {
                Ok(Some(backing)) if backing == file_name => children.push(disk.name),
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(IoError::with(format!("reading {}", child.display()))(e)),
            }
        }
        Ok(children)
    }

    /// Creates an empty disk of `size` bytes (see [`crate::size::parse_disk_size`]).
    pub async fn create_disk(&self, name: &str, format: DiskFormat, size: u64) -> Result<DiskInfo, CreateDiskError> {
        name::check(name)?;
        check_disk_size(size)?;
        if self.disk_exists(name) {
            return Err(CreateDiskError::Exists(name.into()));
        }
        let temp = self.temp(DISKS, name, format.as_str());
        qemu_img::run(&[
            "create".into(),
            "-q".into(),
            "-f".into(),
            format.as_str().into(),
            temp.path.clone().into(),
            size.to_string().into(),
        ])
        .await?;
        if !self.publish_disk(temp, name, format).await? {
            return Err(CreateDiskError::Exists(name.into()));
        }
        self.disk_info(name).await.map_err(|e| match e {
            DiskInfoError::Tool(t) => CreateDiskError::Tool(t),
            other => CreateDiskError::Io(IoError {
                context: format!("reading the new disk '{name}'"),
                source: std::io::Error::other(other.to_string()),
            }),
        })
    }

    /// Inspects a disk with `qemu-img info` (format fixed by the extension) and checks its
    /// backing reference.
    pub async fn disk_info(&self, name: &str) -> Result<DiskInfo, DiskInfoError> {
        name::check(name)?;
        let (path, format) = self
            .find_disk(name)
            .ok_or_else(|| DiskInfoError::NotFound(name.into()))?;
        let json = qemu_img::info(&path, Some(format.as_str())).await?;
        let info = qemu_img::parse_info(&json).map_err(|source| DiskInfoError::Parse {
            name: name.into(),
            source,
        })?;
        let unsafe_backing = |backing: &str| DiskInfoError::UnsafeBacking {
            name: name.into(),
            backing: backing.into(),
        };
        let backing = match (&info.backing_filename, &info.backing_format) {
            (None, _) => None,
            (Some(backing), backing_format) => {
                let (parent, parent_format) = split_disk_file_name(backing).ok_or_else(|| unsafe_backing(backing))?;
                if backing_format.as_deref() != Some(parent_format.as_str())
                    || parent == name
                    || !is_regular_file(&self.disk_path(parent, parent_format))
                {
                    return Err(unsafe_backing(backing));
                }
                Some(parent.to_owned())
            }
        };
        if let Some(data_file) = info.data_file {
            return Err(unsafe_backing(&data_file));
        }
        Ok(DiskInfo {
            name: name.into(),
            format,
            virtual_size: info.virtual_size,
            actual_size: info.actual_size,
            backing,
            path,
        })
    }

    /// Imports the image at `source` (any format in [`qemu_img::FOREIGN_FORMATS`]), converting
    /// it to `format`, with progress in percent.
    pub async fn import_disk(
        &self,
        name: &str,
        source: &Path,
        format: DiskFormat,
        progress: &mut (dyn FnMut(f64) + Send),
    ) -> Result<DiskInfo, ImportError> {
        name::check(name)?;
        pool::check_source(source)?;
        if self.disk_exists(name) {
            return Err(ImportError::Exists(name.into()));
        }
        let image = qemu_img::probe(source).await??;
        let temp = self.temp(DISKS, name, format.as_str());
        qemu_img::convert(source, &image.format, &temp.path, format.as_str(), progress).await?;
        if !self.publish_disk(temp, name, format).await? {
            return Err(ImportError::Exists(name.into()));
        }
        self.disk_info(name).await.map_err(|e| info_as_io(name, e))
    }

    /// Stores the image arriving on `body` as disk `name` once its SHA-256 equals
    /// `expected_sha256`. A raw or qcow2 image is kept as it is; vmdk, vdi, vhdx and vpc are
    /// converted to qcow2; anything else is refused.
    pub async fn upload_disk(
        &self,
        name: &str,
        body: &mut (impl tokio::io::AsyncRead + Unpin),
        expected_sha256: &str,
    ) -> Result<DiskInfo, UploadError> {
        name::check(name)?;
        let expected =
            crate::parse_sha256(expected_sha256).ok_or_else(|| UploadError::BadChecksum(expected_sha256.into()))?;
        if self.disk_exists(name) {
            return Err(UploadError::Exists(name.into()));
        }
        let upload = self.temp(DISKS, name, "upload");
        let (actual, len) = copy_hashing(body, &upload.path, MAX_DISK_SIZE)
            .await
            .map_err(|e| match e {
                CopyError::Body(e) => UploadError::Body(e),
                CopyError::TooLarge(limit) => UploadError::TooLarge(limit),
                CopyError::Io(e) => UploadError::Io(e),
            })?;
        if actual != expected {
            return Err(UploadError::ChecksumMismatch {
                expected: hex::encode(expected),
                actual: hex::encode(actual),
            });
        }
        if len == 0 {
            return Err(UploadError::Empty);
        }
        let image = qemu_img::probe(&upload.path).await??;
        let (stored, format) = match image.format.as_str() {
            "raw" if !len.is_multiple_of(512) => return Err(UploadError::Unaligned(len)),
            "raw" => (upload, DiskFormat::Raw),
            "qcow2" => (upload, DiskFormat::Qcow2),
            other => {
                let converted = self.temp(DISKS, name, "qcow2");
                qemu_img::convert(&upload.path, other, &converted.path, "qcow2", &mut |_| {}).await?;
                (converted, DiskFormat::Qcow2)
            }
        };
        if !self.publish_disk(stored, name, format).await? {
            return Err(UploadError::Exists(name.into()));
        }
        self.disk_info(name).await.map_err(|e| match info_as_io(name, e) {
            ImportError::Tool(t) => UploadError::Tool(t),
            ImportError::Io(e) => UploadError::Io(e),
            other => UploadError::Io(IoError {
                context: format!("reading the uploaded disk '{name}'"),
                source: std::io::Error::other(other.to_string()),
            }),
        })
    }

    /// Opens a disk's file for download (the format tells the client what it gets).
    pub async fn download_disk(&self, name: &str) -> Result<Download, DownloadError> {
        name::check(name)?;
        let (path, format) = self
            .find_disk(name)
            .ok_or_else(|| DownloadError::NotFound(name.into()))?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(IoError::with(format!("opening {}", path.display())))?;
        let len = file
            .metadata()
            .await
            .map_err(IoError::with(format!("reading {}", path.display())))?
            .len();
        Ok(Download { file, len, format })
    }

    /// Changes a disk's virtual size to `size` bytes. Shrinking (which loses the data beyond
    /// the new end) needs `force`.
    pub async fn resize_disk(&self, name: &str, size: u64, force: bool) -> Result<DiskInfo, ResizeError> {
        name::check(name)?;
        check_disk_size(size)?;
        let info = self.disk_info(name).await?;
        if let Some(child) = self.disk_children(name)?.into_iter().next() {
            return Err(ResizeError::HasChildren {
                name: name.into(),
                child,
            });
        }
        if size == info.virtual_size {
            return Ok(info);
        }
        let shrink = size < info.virtual_size;
        if shrink && !force {
            return Err(ResizeError::WouldShrink {
                name: name.into(),
                current: info.virtual_size,
                requested: size,
            });
        }
        let mut args = vec!["resize".into(), "-q".into(), "-f".into(), info.format.as_str().into()];
        if shrink {
            args.push("--shrink".into());
        }
        args.extend([info.path.clone().into(), size.to_string().into()]);
        qemu_img::run(&args).await?;
        Ok(self.disk_info(name).await?)
    }

    /// What every copy of a disk checks first: both names, that `source` exists (its info),
    /// and that nothing is called `name` yet (checked again when the copy is published).
    pub(crate) async fn clone_source(&self, source: &str, name: &str) -> Result<DiskInfo, CloneError> {
        name::check(source)?;
        name::check(name)?;
        let info = self.disk_info(source).await.map_err(|e| match e {
            DiskInfoError::NotFound(n) => CloneError::SourceNotFound(n),
            other => CloneError::Info(other),
        })?;
        if self.disk_exists(name) {
            return Err(CloneError::Exists(name.into()));
        }
        Ok(info)
    }

    /// Makes `name` a linked clone of `parent`: a thin qcow2 whose backing file is the parent
    /// (which then cannot change until the clone is deleted).
    pub async fn linked_clone(&self, parent: &str, name: &str) -> Result<DiskInfo, CloneError> {
        let parent_info = self.clone_source(parent, name).await?;
        let parent_file = format!("{parent}.{}", parent_info.format);
        let temp = self.temp(DISKS, name, "qcow2");
        qemu_img::run(&[
            "create".into(),
            "-q".into(),
            "-f".into(),
            "qcow2".into(),
            "-b".into(),
            parent_file.into(),
            "-F".into(),
            parent_info.format.as_str().into(),
            temp.path.clone().into(),
        ])
        .await?;
        {
            let _commit = self.commit.lock().await;
            if !is_regular_file(&parent_info.path) {
                return Err(CloneError::SourceGone(parent.into()));
            }
            if self.disk_exists(name) {
                return Err(CloneError::Exists(name.into()));
            }
            let dest = self.disk_path(name, DiskFormat::Qcow2);
            temp.publish(&dest)
                .map_err(IoError::with(format!("creating {}", dest.display())))?;
        }
        Ok(self.disk_info(name).await?)
    }

    /// Copies disk `source` to a new, independent disk `name` of the same format (a linked
    /// source is flattened), with progress in percent.
    pub async fn full_clone(
        &self,
        source: &str,
        name: &str,
        progress: &mut (dyn FnMut(f64) + Send),
    ) -> Result<DiskInfo, CloneError> {
        let source_info = self.clone_source(source, name).await?;
        let format = source_info.format;
        let temp = self.temp(DISKS, name, format.as_str());
        qemu_img::convert(
            &source_info.path,
            format.as_str(),
            &temp.path,
            format.as_str(),
            progress,
        )
        .await?;
        if !self.publish_disk(temp, name, format).await? {
            return Err(CloneError::Exists(name.into()));
        }
        Ok(self.disk_info(name).await?)
    }

    /// Replaces a disk's contents with zeros, keeping its name, format and virtual size (a
    /// linked clone becomes standalone). `in_use` returns who uses a disk, if anyone.
    pub async fn wipe_disk(&self, name: &str, in_use: impl Fn(&str) -> Option<String>) -> Result<DiskInfo, WipeError> {
        name::check(name)?;
        let info = self.disk_info(name).await.map_err(|e| match e {
            DiskInfoError::NotFound(n) => WipeError::NotFound(n),
            other => WipeError::Info(other),
        })?;
        let temp = self.temp(DISKS, name, info.format.as_str());
        qemu_img::run(&[
            "create".into(),
            "-q".into(),
            "-f".into(),
            info.format.as_str().into(),
            temp.path.clone().into(),
            info.virtual_size.to_string().into(),
        ])
        .await?;
        self.replace_disk_file(name, &info, temp, in_use).await
    }

    /// Puts complete file `temp` in place of disk `name` (described by `info`), under the
    /// commit lock: refused while `in_use` names a user, another disk is backed by it, or it
    /// is gone. Shared by wipe and backup restore.
    pub(crate) async fn replace_disk_file(
        &self,
        name: &str,
        info: &DiskInfo,
        temp: pool::TempPath,
        in_use: impl Fn(&str) -> Option<String>,
    ) -> Result<DiskInfo, WipeError> {
        let commit = self.commit.lock().await;
        if let Some(user) = in_use(name) {
            return Err(WipeError::InUse {
                name: name.into(),
                user,
            });
        }
        if let Some(child) = self.disk_children(name)?.into_iter().next() {
            return Err(WipeError::HasChildren {
                name: name.into(),
                child,
            });
        }
        if !is_regular_file(&info.path) {
            return Err(WipeError::NotFound(name.into()));
        }
        temp.replace(&info.path)
            .map_err(IoError::with(format!("replacing {}", info.path.display())))?;
        drop(commit);
        Ok(self.disk_info(name).await?)
    }

    /// Deletes a disk unless `in_use` names a user of it or another disk is backed by it.
    pub async fn delete_disk(
        &self,
        name: &str,
        in_use: impl Fn(&str) -> Option<String>,
    ) -> Result<(), DeleteDiskError> {
        name::check(name)?;
        let _commit = self.commit.lock().await;
        let (path, _) = self
            .find_disk(name)
            .ok_or_else(|| DeleteDiskError::NotFound(name.into()))?;
        if let Some(user) = in_use(name) {
            return Err(DeleteDiskError::InUse {
                name: name.into(),
                user,
            });
        }
        if let Some(child) = self.disk_children(name)?.into_iter().next() {
            return Err(DeleteDiskError::HasChildren {
                name: name.into(),
                child,
            });
        }
        std::fs::remove_file(&path).map_err(IoError::with(format!("deleting {}", path.display())))?;
        Ok(())
    }
}

/// A caller's `in_use` that says no disk is in use.
pub fn unused(_: &str) -> Option<String> {
    None
}

/// Splits `<name>.qcow2` / `<name>.raw` into a valid name and its format.
fn split_disk_file_name(file_name: &str) -> Option<(&str, DiskFormat)> {
    let (stem, extension) = file_name.rsplit_once('.')?;
    let format = DiskFormat::parse(extension)?;
    name::check(stem).ok()?;
    Some((stem, format))
}

fn info_as_io(name: &str, error: DiskInfoError) -> ImportError {
    match error {
        DiskInfoError::Tool(t) => ImportError::Tool(t),
        other => ImportError::Io(IoError {
            context: format!("reading the new disk '{name}'"),
            source: std::io::Error::other(other.to_string()),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_disk_file_names() {
        assert_eq!(split_disk_file_name("web.qcow2"), Some(("web", DiskFormat::Qcow2)));
        assert_eq!(split_disk_file_name("a.b.raw"), Some(("a.b", DiskFormat::Raw)));
        assert_eq!(split_disk_file_name("../x.qcow2"), None);
        assert_eq!(split_disk_file_name("/etc/passwd"), None);
        assert_eq!(split_disk_file_name(".tmp-1.qcow2"), None);
        assert_eq!(split_disk_file_name("x.vmdk"), None);
    }
}
