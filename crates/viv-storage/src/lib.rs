//! VM storage for Vivarium's VM manager: a directory [`DirPool`] of disks (qcow2 or raw) and ISOs,
//! and cloud-init NoCloud seed images ([`seed`]).
//!
//! Invariants kept by every module:
//! - Nothing a user gives becomes a path unchecked: disk, ISO and seed names pass [`name::check`]
//!   (no separators, no leading dot, a bounded length, `[A-Za-z0-9._-]`); local source paths must
//!   be absolute and name a regular file.
//! - A file appears under its final name only complete: it is written under a temporary name
//!   (a leading dot, which no valid name has) and linked into place; a failed or interrupted
//!   operation leaves no file, and leftovers are removed when the pool opens.
//! - A disk's format is its file extension and is always passed to `qemu-img` (`-f`, `-F`);
//!   probing happens only for images entering the pool, which are checked first
//!   ([`qemu_img::check_foreign`]): no backing file, external data file or extent outside the
//!   image itself.
//! - Every operation has its own error enum; each has a `kind()` ([`ErrorKind`]) a server maps to
//!   an HTTP status, and messages say what to do.

pub mod backing;
pub mod disk;
pub mod iso;
pub mod libvirt;
pub mod name;
pub mod ovf;
mod pool;
pub mod qemu_img;
pub mod seed;
pub mod size;
pub mod snapshot;

pub use disk::{
    unused, CloneError, CreateDiskError, DeleteDiskError, DiskFormat, DiskInfo, DiskInfoError, DiskSummary, Download,
    DownloadError, Export, ExportError, ExportFormat, ImportError, ResizeError, UploadError, WipeError,
};
pub use iso::{IsoAddError, IsoError, IsoInfo};
pub use pool::{DirPool, OpenPoolError, SourceError};
pub use seed::{build_seed_documents_iso, build_seed_iso, SeedConfig, SeedDocuments, SeedError};

/// What kind of failure an error is, for a server to pick a status
/// (404, 409, 400, 500).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The named disk, ISO or source does not exist.
    NotFound,
    /// The request clashes with the pool's state (the name is taken, the disk is in use or has
    /// children).
    Conflict,
    /// The request itself is wrong (a bad name, size, checksum or image).
    BadRequest,
    /// The host failed (I/O, a tool missing or failing).
    Internal,
}

/// A file operation that failed, with what was being done.
#[derive(Debug, thiserror::Error)]
#[error("{context}: {source}")]
pub struct IoError {
    /// What was being done, naming the file.
    pub context: String,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    /// A `map_err` adapter: `.map_err(IoError::with(format!("reading {}", p.display())))`.
    pub(crate) fn with(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> IoError {
        let context = context.into();
        move |source| IoError { context, source }
    }
}

/// A SHA-256 checksum given by a client, as 64 hex digits.
pub(crate) fn parse_sha256(text: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    let text = text.trim();
    let text = text.strip_prefix("sha256:").unwrap_or(text);
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}
