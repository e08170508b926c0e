//! Export of a disk as a standalone image in another format (qcow2, raw, or a streamOptimized
//! VMDK), converted by `qemu-img` into a temporary file of the pool that is unlinked as soon as
//! it is opened, so nothing is left behind whatever happens to the download.
//!
//! Invariant: the disk's format is given (`-f`), its backing chain (pool disks only, checked by
//! `disk_info`) is flattened, and a disk a running VM holds is refused (QEMU's image lock), never
//! read half-written.

use super::DiskInfoError;
use crate::name::{self, NameError};
use crate::pool::DISKS;
use crate::qemu_img::{self, ToolError};
use crate::{DirPool, ErrorKind, IoError};

/// A format a disk can be exported in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// qcow2 (flattened).
    Qcow2,
    /// A plain image.
    Raw,
    /// A streamOptimized VMDK (what OVAs carry; VMware and VirtualBox read it).
    Vmdk,
}

impl ExportFormat {
    /// Parses `qcow2`, `raw` or `vmdk`.
    pub fn parse(text: &str) -> Option<ExportFormat> {
        match text {
            "qcow2" => Some(Self::Qcow2),
            "raw" => Some(Self::Raw),
            "vmdk" => Some(Self::Vmdk),
            _ => None,
        }
    }

    /// The name, also the file extension.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Raw => "raw",
            Self::Vmdk => "vmdk",
        }
    }
}

/// A converted disk ready to stream.
#[derive(Debug)]
pub struct Export {
    /// The file (already unlinked), positioned at its start.
    pub file: tokio::fs::File,
    /// Its length in bytes.
    pub len: u64,
}

/// Why an export failed.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// Bad name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No such disk, or it cannot be read.
    #[error(transparent)]
    Info(#[from] DiskInfoError),
    /// A running VM holds the disk.
    #[error("disk '{0}' is in use by a running VM; stop it first, or back the VM up and export a restored copy")]
    InUse(String),
    /// `qemu-img` failed.
    #[error(transparent)]
    Tool(ToolError),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl ExportError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ExportError::Name(_) => ErrorKind::BadRequest,
            ExportError::Info(e) => e.kind(),
            ExportError::InUse(_) => ErrorKind::Conflict,
            ExportError::Tool(_) | ExportError::Io(_) => ErrorKind::Internal,
        }
    }
}

impl DirPool {
    /// Converts disk `name` to `format` for download.
    pub async fn export_disk(&self, name: &str, format: ExportFormat) -> Result<Export, ExportError> {
        name::check(name)?;
        let info = self.disk_info(name).await?;
        let temp = self.temp(DISKS, name, &format!("export.{}", format.as_str()));
        let mut args: Vec<std::ffi::OsString> = vec![
            "convert".into(),
            "-q".into(),
            "-f".into(),
            info.format.as_str().into(),
            "-O".into(),
            format.as_str().into(),
        ];
        if format == ExportFormat::Vmdk {
            args.extend(["-o".into(), "subformat=streamOptimized".into()]);
        }
        args.extend([info.path.clone().into_os_string(), temp.path.clone().into_os_string()]);
        qemu_img::run(&args).await.map_err(|e| {
            if e.is_lock_conflict() {
                ExportError::InUse(name.into())
            } else {
                ExportError::Tool(e)
            }
        })?;
        let file = tokio::fs::File::open(&temp.path)
            .await
            .map_err(IoError::with(format!("opening {}", temp.path.display())))?;
        let len = file
            .metadata()
            .await
            .map_err(IoError::with(format!("reading {}", temp.path.display())))?
            .len();
        drop(temp);
        Ok(Export { file, len })
    }
}
