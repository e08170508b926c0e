//! cloud-init NoCloud seeds: an ISO 9660 image with the volume id `cidata` holding `user-data`,
//! `meta-data` and optionally `network-config`, made with `xorriso` (Debian package `xorriso`).
//!
//! Invariants: every input is checked before a file is written: user-data and network-config
//! are text (UTF-8 without control characters other than tab and line ends) of bounded size,
//! user-data starts with a header cloud-init acts on, the host name is a valid DNS name and the
//! instance id a [`crate::name`]-style id, so the generated meta-data is plain YAML no input can
//! add keys to. The image is built in a temporary directory and renamed into place whole.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use crate::name::{self, NameError};
use crate::pool::SEEDS;
use crate::{DirPool, ErrorKind, IoError};

/// The largest user-data accepted, in bytes.
pub const MAX_USER_DATA: usize = 256 * 1024;
/// The largest network-config accepted, in bytes.
pub const MAX_NETWORK_CONFIG: usize = 64 * 1024;

/// First lines cloud-init recognises as a user-data format.
const USER_DATA_HEADERS: [&str; 8] = [
    "#cloud-config",
    "#!",
    "#include",
    "#cloud-boothook",
    "#part-handler",
    "#cloud-config-archive",
    "## template: jinja",
    "Content-Type: multipart/",
];

/// What a seed holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedConfig {
    /// `instance-id`: a new one makes cloud-init run its first-boot steps again.
    pub instance_id: String,
    /// `local-hostname`.
    pub hostname: String,
    /// The user-data document (`#cloud-config`, a script, ...).
    pub user_data: String,
    /// A network configuration (version 1 or 2), if any.
    pub network_config: Option<String>,
}

/// Why a seed could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    /// Bad seed name.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Bad instance id.
    #[error("the instance id '{0}' is not usable; use 1 to 64 letters, digits, '.', '_' or '-'")]
    InstanceId(String),
    /// Bad host name.
    #[error("the host name '{0}' is not a DNS name; use labels of letters, digits and '-' separated by dots")]
    Hostname(String),
    /// A document is not text.
    #[error("the {0} is not text (it holds bytes other than UTF-8 text, tabs and line ends)")]
    NotText(&'static str),
    /// A document is too large.
    #[error("the {what} is {size} bytes; at most {limit} are accepted")]
    TooLarge {
        /// Which document.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// User-data cloud-init would ignore.
    #[error("the user-data starts with neither '#cloud-config', '#!' nor another header cloud-init knows; cloud-init would ignore it")]
    UserDataFormat,
    /// `xorriso` is not installed.
    #[error("`xorriso` is not installed; install the Debian package `xorriso`")]
    MissingTool,
    /// `xorriso` failed.
    #[error("`xorriso` failed ({status}): {stderr}")]
    Tool {
        /// Its exit status.
        status: String,
        /// The end of its error output.
        stderr: String,
    },
    /// No such seed.
    #[error("no seed named '{0}' in the pool")]
    NotFound(String),
    /// A file operation failed.
    #[error(transparent)]
    Io(#[from] IoError),
}

impl SeedError {
    /// How a server should report it.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SeedError::NotFound(_) => ErrorKind::NotFound,
            SeedError::MissingTool | SeedError::Tool { .. } | SeedError::Io(_) => ErrorKind::Internal,
            _ => ErrorKind::BadRequest,
        }
    }
}

impl SeedConfig {
    /// Checks every field (see the module invariants).
    pub fn check(&self) -> Result<(), SeedError> {
        if name::check(&self.instance_id).is_err() {
            return Err(SeedError::InstanceId(self.instance_id.clone()));
        }
        check_hostname(&self.hostname)?;
        check_text("user-data", &self.user_data, MAX_USER_DATA)?;
        if !USER_DATA_HEADERS.iter().any(|h| self.user_data.starts_with(h)) {
            return Err(SeedError::UserDataFormat);
        }
        if let Some(network) = &self.network_config {
            check_text("network-config", network, MAX_NETWORK_CONFIG)?;
        }
        Ok(())
    }

    /// The meta-data document.
    pub fn meta_data(&self) -> String {
        format!("instance-id: {}\nlocal-hostname: {}\n", self.instance_id, self.hostname)
    }
}

fn check_hostname(hostname: &str) -> Result<(), SeedError> {
    let valid_label = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if hostname.is_empty() || hostname.len() > 253 || !hostname.split('.').all(valid_label) {
        return Err(SeedError::Hostname(hostname.into()));
    }
    Ok(())
}

fn check_text(what: &'static str, text: &str, limit: usize) -> Result<(), SeedError> {
    if text.len() > limit {
        return Err(SeedError::TooLarge {
            what,
            size: text.len(),
            limit,
        });
    }
    if text.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')) {
        return Err(SeedError::NotText(what));
    }
    Ok(())
}

/// Builds the seed image for `config` at `dest` (replacing it), working in a temporary
/// directory beside it.
pub async fn build_seed_iso(config: &SeedConfig, dest: &Path) -> Result<(), SeedError> {
    config.check()?;
    let mut documents = vec![
        ("user-data", config.user_data.clone()),
        ("meta-data", config.meta_data()),
    ];
    if let Some(network) = &config.network_config {
        documents.push(("network-config", network.clone()));
    }
    write_seed_image(&documents, dest).await
}

/// A seed whose documents are given whole, meta-data included (as a VM definition holds them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedDocuments {
    /// The user-data document.
    pub user_data: String,
    /// The meta-data document (YAML).
    pub meta_data: String,
    /// A network configuration, if any.
    pub network_config: Option<String>,
}

/// The largest meta-data accepted, in bytes.
pub const MAX_META_DATA: usize = 64 * 1024;

impl SeedDocuments {
    /// Checks every document: text of bounded size, user-data with a header cloud-init acts on.
    pub fn check(&self) -> Result<(), SeedError> {
        check_text("user-data", &self.user_data, MAX_USER_DATA)?;
        if !USER_DATA_HEADERS.iter().any(|h| self.user_data.starts_with(h)) {
            return Err(SeedError::UserDataFormat);
        }
        check_text("meta-data", &self.meta_data, MAX_META_DATA)?;
        if let Some(network) = &self.network_config {
            check_text("network-config", network, MAX_NETWORK_CONFIG)?;
        }
        Ok(())
    }
}

/// Builds the seed image holding `docs` at `dest` (replacing it).
pub async fn build_seed_documents_iso(docs: &SeedDocuments, dest: &Path) -> Result<(), SeedError> {
    docs.check()?;
    let mut documents = vec![
        ("user-data", docs.user_data.clone()),
        ("meta-data", docs.meta_data.clone()),
    ];
    if let Some(network) = &docs.network_config {
        documents.push(("network-config", network.clone()));
    }
    write_seed_image(&documents, dest).await
}

/// Writes `documents` (file name, text) into an ISO labelled `cidata` at `dest`, built in a
/// temporary directory beside it and renamed into place whole.
async fn write_seed_image(documents: &[(&'static str, String)], dest: &Path) -> Result<(), SeedError> {
    let parent = dest.parent().unwrap_or(Path::new("/"));
    let work = crate::pool::TempPath {
        path: parent.join(format!(".tmp-seed-{}-{}", std::process::id(), unique())),
    };
    let io = |what: &Path| IoError::with(format!("writing {}", what.display()));
    std::fs::create_dir(&work.path).map_err(io(&work.path))?;
    let files = work.path.join("files");
    std::fs::create_dir(&files).map_err(io(&files))?;
    for (file, text) in documents {
        let path = files.join(file);
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    let image = work.path.join("seed.iso");
    let mut args: Vec<OsString> = ["-as", "mkisofs", "-quiet", "-V", "cidata", "-J", "-r", "-o"]
        .map(OsString::from)
        .to_vec();
    args.push(image.clone().into());
    args.extend(documents.iter().map(|(file, _)| OsString::from(*file)));
    let output = tokio::process::Command::new("xorriso")
        .args(&args)
        .current_dir(&files)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                SeedError::MissingTool
            } else {
                SeedError::Io(IoError::with("starting xorriso")(e))
            }
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: String = stderr
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n");
        return Err(SeedError::Tool {
            status: output.status.to_string(),
            stderr: tail,
        });
    }
    std::fs::File::open(&image)
        .and_then(|f| f.sync_all())
        .map_err(io(&image))?;
    std::fs::rename(&image, dest).map_err(io(dest))?;
    Ok(())
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

impl DirPool {
    fn seed_file(&self, name: &str) -> PathBuf {
        self.dir(SEEDS).join(format!("{name}.iso"))
    }

    /// Builds (or rebuilds) the seed `name`, usually named after its VM, returning its path.
    pub async fn create_seed(&self, name: &str, config: &SeedConfig) -> Result<PathBuf, SeedError> {
        name::check(name)?;
        let dest = self.seed_file(name);
        build_seed_iso(config, &dest).await?;
        Ok(dest)
    }

    /// Builds (or rebuilds) the seed `name` from whole documents, returning its path.
    pub async fn create_seed_documents(&self, name: &str, docs: &SeedDocuments) -> Result<PathBuf, SeedError> {
        name::check(name)?;
        let dest = self.seed_file(name);
        build_seed_documents_iso(docs, &dest).await?;
        Ok(dest)
    }

    /// The file of the seed `name` (which may not exist).
    pub fn seed_path(&self, name: &str) -> Result<PathBuf, SeedError> {
        name::check(name)?;
        Ok(self.seed_file(name))
    }

    /// Deletes the seed `name`.
    pub fn delete_seed(&self, name: &str) -> Result<(), SeedError> {
        name::check(name)?;
        let path = self.seed_file(name);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(SeedError::NotFound(name.into())),
            Err(e) => Err(IoError::with(format!("deleting {}", path.display()))(e).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SeedConfig {
        SeedConfig {
            instance_id: "vm-1".into(),
            hostname: "web1.example".into(),
            user_data: "#cloud-config\npackages: [curl]\n".into(),
            network_config: None,
        }
    }

    #[test]
    fn checks_inputs() {
        assert!(config().check().is_ok());
        let bad = |f: fn(&mut SeedConfig)| {
            let mut c = config();
            f(&mut c);
            c.check().unwrap_err()
        };
        assert!(matches!(bad(|c| c.hostname = "web_1".into()), SeedError::Hostname(_)));
        assert!(matches!(bad(|c| c.hostname = "-a".into()), SeedError::Hostname(_)));
        assert!(matches!(bad(|c| c.hostname = "a\nb: c".into()), SeedError::Hostname(_)));
        assert!(matches!(
            bad(|c| c.instance_id = "x\ny: z".into()),
            SeedError::InstanceId(_)
        ));
        assert!(matches!(
            bad(|c| c.user_data = "#cloud-config\n\0".into()),
            SeedError::NotText(_)
        ));
        assert!(matches!(
            bad(|c| c.user_data = "packages: []".into()),
            SeedError::UserDataFormat
        ));
        assert!(matches!(
            bad(|c| c.user_data = format!("#!/bin/sh\n{}", "x".repeat(MAX_USER_DATA))),
            SeedError::TooLarge { .. }
        ));
        let docs = SeedDocuments {
            user_data: "#cloud-config\n".into(),
            meta_data: "instance-id: a\n".into(),
            network_config: None,
        };
        assert!(docs.check().is_ok());
        assert!(matches!(
            SeedDocuments {
                meta_data: "x\u{7}".into(),
                ..docs.clone()
            }
            .check(),
            Err(SeedError::NotText("meta-data"))
        ));
        assert_eq!(
            config().meta_data(),
            "instance-id: vm-1\nlocal-hostname: web1.example\n"
        );
    }
}
