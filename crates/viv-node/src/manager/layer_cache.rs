//! A host's cache of template build layers shared by servers (`--layer-cache-dir DIR`, holding
//! `DIR/<key>.qcow2`), as Docker's build cache is: a server building a step whose layer another
//! server (or an earlier data directory) built takes it from here instead of running the step
//! again, so fresh data directories (test servers, a reinstall) build the code interpreter's
//! package layers once per host. Off unless configured.
//!
//! Invariants:
//! - a layer's key already names everything that made it (its parent's key, the step, the
//!   configuration, the files copied, and for the first step the identity of the file it is
//!   built `FROM`), so a cached layer is valid for any data directory that asks for that key;
//! - cached files name their parent layer by a relative file name (`<parent key>.qcow2`, resolved
//!   beside the file), so a layer works in whichever `layers/` directory it is linked into; the
//!   first layer names its base (a root file system in the cache directory) by absolute path;
//! - a file appears under its key only complete (written aside, then renamed) and is never
//!   written again: data directories hard-link it, and QEMU opens layers read-only;
//! - the cache stays under its budget (`VIV_LAYER_CACHE_MIB`, default 20 GiB) by dropping the
//!   least recently used files; a data directory's hard link keeps its copy alive.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::Manager;

/// Budget of the layer cache when `VIV_LAYER_CACHE_MIB` does not set one.
const DEFAULT_BUDGET_MIB: u64 = 20 * 1024;

/// Staged files older than this are left over from a server that died while storing.
const STALE_STAGING_SECS: u64 = 3600;

impl Manager {
    /// Puts the cached layer `key` at `target` (a hard link, or a copy across file systems);
    /// true when it did.
    pub(super) fn fetch_cached_layer(&self, key: &str, target: &Path) -> bool {
        let Some(dir) = &self.config.layer_cache_dir else {
            return false;
        };
        let cached = dir.join(format!("{key}.qcow2"));
        if !cached.is_file() {
            return false;
        }
        if let Some(dir) = target.parent() {
            if std::fs::create_dir_all(dir).is_err() {
                return false;
            }
        }
        let placed = std::fs::hard_link(&cached, target).or_else(|_| {
            let staged = target.with_extension("fetching");
            std::fs::copy(&cached, &staged)?;
            std::fs::rename(&staged, target)
        });
        match placed {
            Ok(()) => {
                // Recently used: the last to be dropped when the cache is over its budget.
                let _ = filetime_now(&cached);
                tracing::info!(key, "layer taken from the host's layer cache");
                true
            }
            Err(err) => {
                tracing::warn!(key, error = %err, "cannot take a layer from the host's layer cache");
                false
            }
        }
    }

    /// Offers the layers of a finished build to the cache (those it lacks are copied in with
    /// their parent named relatively), then trims the cache to its budget. Failures only log:
    /// the cache is an optimization.
    pub(super) async fn offer_layers(&self, keys: Vec<String>) {
        let Some(dir) = self.config.layer_cache_dir.clone() else {
            return;
        };
        let layers: Vec<(String, PathBuf)> = keys
            .into_iter()
            .map(|key| {
                let path = self.config.data_dir.join("layers").join(format!("{key}.qcow2"));
                (key, path)
            })
            .collect();
        let result = tokio::task::spawn_blocking(move || store_layers(&dir, &layers)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => tracing::warn!(error = %err, "cannot store layers in the host's layer cache"),
            Err(err) => tracing::warn!(error = %err, "the layer cache task failed"),
        }
    }
}

fn store_layers(dir: &Path, layers: &[(String, PathBuf)]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    remove_stale_staging(dir);
    for (key, source) in layers {
        let target = dir.join(format!("{key}.qcow2"));
        if target.is_file() || !source.is_file() {
            continue;
        }
        let staged = dir.join(format!(".{key}.{}.staging", std::process::id()));
        std::fs::copy(source, &staged)?;
        if let Err(err) = relative_parent(source, &staged) {
            let _ = std::fs::remove_file(&staged);
            return Err(err);
        }
        std::fs::rename(&staged, &target)?;
    }
    trim(dir, budget_bytes())
}

/// Rewrites the header of `staged` (a copy of `source`) to name a parent that lies beside
/// `source` by its bare file name; a parent elsewhere (a base image) keeps its absolute path.
fn relative_parent(source: &Path, staged: &Path) -> std::io::Result<()> {
    let header = viv_vmm::qcow2::header(source)?;
    let Some(parent) = header.backing_file else {
        return Ok(());
    };
    let parent = PathBuf::from(parent);
    let beside = parent.parent() == source.parent() && parent.is_absolute();
    let Some(name) = parent.file_name().filter(|_| beside) else {
        return Ok(());
    };
    rename_parent(staged, Path::new(name))
}

/// Rewrites the parent `layer` (a qcow2 layer) names in its header to `parent`, leaving the
/// data as it is (`qemu-img rebase -u`).
pub(super) fn rename_parent(layer: &Path, parent: &Path) -> std::io::Result<()> {
    let out = std::process::Command::new("qemu-img")
        .args(["rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(parent)
        .arg(layer)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "qemu-img rebase: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn budget_bytes() -> u64 {
    std::env::var("VIV_LAYER_CACHE_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(DEFAULT_BUDGET_MIB)
        .saturating_mul(1 << 20)
}

/// Drops the least recently used layers until the cache fits `budget` bytes.
fn trim(dir: &Path, budget: u64) -> std::io::Result<()> {
    let mut files: Vec<(SystemTime, u64, PathBuf)> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((meta.modified().ok()?, meta.len(), e.path()))
        })
        .collect();
    let mut total: u64 = files.iter().map(|(_, len, _)| len).sum();
    files.sort();
    for (_, len, path) in files {
        if total <= budget {
            break;
        }
        if std::fs::remove_file(&path).is_ok() {
            total -= len;
        }
    }
    Ok(())
}

fn remove_stale_staging(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.filter_map(Result::ok) {
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age.as_secs() > STALE_STAGING_SECS);
        if stale && entry.file_name().to_string_lossy().ends_with(".staging") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Sets a file's modification time to now (its place in the least-recently-used order).
fn filetime_now(path: &Path) -> std::io::Result<()> {
    let file = std::fs::File::options().append(true).open(path)?;
    file.set_modified(SystemTime::now())
}
