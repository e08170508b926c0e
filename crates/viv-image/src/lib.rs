//! Guest images, built on first use and cached by content under one directory.
//!
//! Three kinds of artifact make a bootable sandbox:
//! - the [`kernel`]: Debian's `linux-image-*-cloud-amd64` package, fetched with
//!   `apt-get download` and unpacked (never installed), with the virtio modules the guest needs;
//! - the [`initramfs`]: the agent as `/init` plus those modules and their load order;
//! - the [`rootfs`]: a root file system as a read-only qcow2 base layer, built with mmdebstrap or
//!   imported from a directory or an ext4 image.
//!
//! Invariant: an artifact is written under a temporary name and renamed into place only once
//! complete, and builds of one artifact are serialized with a lock file, so a crashed or
//! interrupted build never leaves anything a later run would trust. Leftover temporaries are
//! removed when the store is opened.

pub mod cpio;
pub mod initramfs;
pub mod kernel;
pub mod rootfs;
mod store;

pub use store::{ImageStore, LogProgress, Progress};

use std::path::PathBuf;

/// Why an image could not be built or found.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An external tool failed.
    #[error("{command} failed ({status}): {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its output, to show the user.
        output: String,
    },
    /// An external tool is not installed.
    #[error("`{tool}` is not installed; install the Debian package `{package}`")]
    MissingTool {
        /// The program.
        tool: String,
        /// The package that provides it.
        package: String,
    },
    /// A file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The input is not usable.
    #[error("{0}")]
    Invalid(String),
    /// A named image does not exist.
    #[error("image '{0}' not found")]
    NotFound(String),
}

impl ImageError {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let context = context.into();
        move |source| Self::Io { context, source }
    }
}

/// The files a VM boots from (none, `Default`, for a server that boots no VM).
#[derive(Debug, Clone, Default)]
pub struct BootImages {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The agent initramfs.
    pub initramfs: PathBuf,
    /// The root file system base layer (qcow2, read-only).
    pub rootfs: PathBuf,
}
