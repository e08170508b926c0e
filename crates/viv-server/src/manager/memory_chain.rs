//! Memory diff chains of snapshot nodes: a node's `state` keeps only the guest pages that
//! differ from its parent's memory, composed at restore onto a persistent base.
//!
//! A sandbox VM started from a template maps the template's memory file privately; one restored
//! from a chain maps the chain's base. That file's path is recorded in the VM's run directory
//! (`memory-base`). When such a sandbox is saved, QEMU writes its whole memory as today; the
//! template's memory file is then copied once to `memory-bases/<id>.mem` (sparse; the id hashes
//! the file's path, inode, size and time, so a new generation gets a new base) and the saved
//! state is rewritten as a diff ([`viv_vmm::memdiff`]) against the parent node's composed memory
//! (its chain: the parent, its `memory.parent`, … up to the base) or, when the parent has no
//! chain on this base or its chain is [`chain_limit`] long, against the base alone (this bounds
//! the depth: a long chain is cut by the next save, never rewritten in place). The node gets
//! `memory.base` (the base id) and, when chained, `memory.parent` (the parent node's id).
//!
//! Invariants:
//! - a diff is made in the node's `.building` directory and renamed with it; any failure keeps
//!   the full state (the node then restores as before, with anonymous memory);
//! - `memory.base` is written before the base is persisted, so the collector (which keeps every
//!   base named by a node, a `.building` node or a run directory) never removes a base a save
//!   is about to use;
//! - a node's memory parent is its parent in the snapshot tree, which the tree's collector keeps
//!   while the node exists, so a chain loses a part only by damage; a restore whose chain lacks a
//!   part or has a damaged one fails with a 409 naming that file, before any VM starts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::Digest as _;
use viv_vmm::memdiff::{self, Chain};

use super::Manager;
use crate::error::ApiError;

/// The file in a VM's run directory naming the memory file it maps privately.
pub(super) const MEMORY_BASE: &str = "memory-base";
/// A node's base id.
const NODE_BASE: &str = "memory.base";
/// A node's memory parent (absent: a diff against the base alone).
const NODE_PARENT: &str = "memory.parent";
impl Manager {
    fn memory_bases_dir(&self) -> PathBuf {
        self.config.data_dir.join("memory-bases")
    }

    /// Records in `run_dir` which memory file the VM started there maps privately.
    pub(super) fn record_memory_base(&self, run_dir: &Path, file: &Path) {
        if let Err(err) = std::fs::write(run_dir.join(MEMORY_BASE), file.as_os_str().as_encoded_bytes()) {
            tracing::warn!(dir = %run_dir.display(), %err, "recording the VM's memory base; its snapshots keep their whole memory");
        }
    }

    /// The chain of node `id`: its diffs root first (its own last) and its base file, or None
    /// for a node whose state holds all its memory. Missing or damaged parts are a 409 naming
    /// them.
    pub(super) async fn node_memory(&self, dir: &Path) -> Result<Option<(PathBuf, Arc<Chain>)>, ApiError> {
        let Ok(base_id) = std::fs::read_to_string(dir.join(NODE_BASE)) else {
            return Ok(None);
        };
        let id = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let base = self.memory_bases_dir().join(format!("{}.mem", base_id.trim()));
        if !base.is_file() {
            return Err(ApiError::Conflict(format!(
                "snapshot {id} cannot be restored: its memory base {} is missing",
                base.display()
            )));
        }
        let parts = self.chain_parts(dir)?;
        let chain = tokio::task::spawn_blocking(move || Chain::load(&parts))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(|e| ApiError::Conflict(format!("snapshot {id} cannot be restored: {e}")))?;
        Ok(Some((base, Arc::new(chain))))
    }

    /// The state files of node `dir`'s chain, root first.
    fn chain_parts(&self, dir: &Path) -> Result<Vec<PathBuf>, ApiError> {
        let leaf = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let mut parts = Vec::new();
        let mut current = dir.to_path_buf();
        loop {
            let state = current.join("state");
            if !state.is_file() {
                return Err(ApiError::Conflict(format!(
                    "snapshot {leaf} cannot be restored: part {} of its memory chain is missing",
                    state.display()
                )));
            }
            parts.push(state);
            if parts.len() > 10_000 {
                return Err(ApiError::Internal(format!("the memory chain of snapshot {leaf} loops")));
            }
            match std::fs::read_to_string(current.join(NODE_PARENT)) {
                Ok(parent) => current = self.node_dir(parent.trim()),
                Err(_) => break,
            }
        }
        parts.reverse();
        Ok(parts)
    }

    /// Rewrites the full state just saved in `building` (a node of sandbox `run_dir`'s VM,
    /// whose parent node is `parent`) as a diff. On any failure the full state stays.
    pub(super) async fn diff_node_memory(&self, run_dir: &Path, building: &Path, parent: Option<&str>) {
        let started = std::time::Instant::now();
        match self.try_diff(run_dir, building, parent).await {
            Ok(Some(stats)) => tracing::info!(
                node = %building.display(),
                pages = stats.records,
                kept = stats.kept,
                bytes = stats.bytes,
                ms = started.elapsed().as_millis() as u64,
                "memory saved as a diff"
            ),
            Ok(None) => {}
            Err(err) => {
                let _ = std::fs::remove_file(building.join(NODE_BASE));
                let _ = std::fs::remove_file(building.join(NODE_PARENT));
                let _ = std::fs::remove_file(building.join("state.tmp"));
                tracing::warn!(node = %building.display(), %err, "memory kept whole: no diff");
            }
        }
    }

    async fn try_diff(
        &self,
        run_dir: &Path,
        building: &Path,
        parent: Option<&str>,
    ) -> Result<Option<memdiff::DiffStats>, String> {
        let Ok(mapped) = std::fs::read(run_dir.join(MEMORY_BASE)) else {
            return Ok(None);
        };
        let mapped = PathBuf::from(String::from_utf8(mapped).map_err(|_| "a memory base path is not UTF-8")?);
        let bases = self.memory_bases_dir();
        let (base_id, persisted) = if mapped.parent() == Some(bases.as_path()) {
            let id = mapped
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .ok_or("a base without a name")?;
            (id, true)
        } else {
            (base_id_of(&mapped)?, false)
        };
        let base = bases.join(format!("{base_id}.mem"));
        // Named before it is made: the collector keeps it from now on.
        std::fs::write(building.join(NODE_BASE), &base_id).map_err(|e| e.to_string())?;
        if !base.is_file() {
            if persisted {
                return Err(format!("memory base {} is gone", base.display()));
            }
            std::fs::create_dir_all(&bases).map_err(|e| e.to_string())?;
            let (from, to) = (mapped.clone(), base.clone());
            let bytes = tokio::task::spawn_blocking(move || memdiff::persist_base(&from, &to))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            tracing::info!(base = %base.display(), bytes, "memory base persisted");
        }
        // The parent's chain, if it is on the same base and not too long.
        let mut chain = Vec::new();
        if let Some(parent) = parent {
            let dir = self.node_dir(parent);
            let same_base = std::fs::read_to_string(dir.join(NODE_BASE)).is_ok_and(|b| b.trim() == base_id);
            if same_base {
                if let Ok(parts) = self.chain_parts(&dir) {
                    if parts.len() < self.config.memory_diff_chain {
                        chain = parts;
                        std::fs::write(building.join(NODE_PARENT), parent).map_err(|e| e.to_string())?;
                    }
                }
            }
        }
        let full = building.join("state");
        let diff = building.join("state.diff");
        let stats = tokio::task::spawn_blocking(move || {
            let stats = memdiff::make_diff(&full, &base, &chain, &diff)?;
            std::fs::rename(&diff, &full).map_err(|source| memdiff::DiffError::Io { path: full, source })?;
            Ok::<_, memdiff::DiffError>(stats)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(Some(stats))
    }

    /// At start: removes base copies a crash interrupted (no save runs yet).
    pub(super) fn recover_memory_bases(&self) {
        for entry in std::fs::read_dir(self.memory_bases_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.path().extension().is_some_and(|e| e == "tmp") {
                tracing::warn!(file = %entry.path().display(), "removing an unfinished memory base");
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Removes memory bases that no node, node being built or VM run directory names.
    pub(super) fn collect_memory_bases(&self) {
        let bases = self.memory_bases_dir();
        let Ok(entries) = std::fs::read_dir(&bases) else { return };
        let mut used = std::collections::HashSet::new();
        let nodes = self.config.data_dir.join("snapshots");
        for entry in std::fs::read_dir(&nodes).into_iter().flatten().flatten() {
            if let Ok(id) = std::fs::read_to_string(entry.path().join(NODE_BASE)) {
                used.insert(id.trim().to_owned());
            }
        }
        let runs = self.config.data_dir.join("sandboxes");
        for entry in std::fs::read_dir(&runs).into_iter().flatten().flatten() {
            if let Ok(path) = std::fs::read_to_string(entry.path().join(MEMORY_BASE)) {
                let path = Path::new(&path);
                if path.parent() == Some(bases.as_path()) {
                    if let Some(stem) = path.file_stem() {
                        used.insert(stem.to_string_lossy().into_owned());
                    }
                } else if let Ok(id) = base_id_of(path) {
                    used.insert(id);
                }
            }
        }
        for entry in entries.flatten() {
            let path = entry.path();
            let stem = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            if path.extension().is_some_and(|e| e == "mem") && !used.contains(&stem) {
                tracing::info!(base = %path.display(), "memory base no longer used");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// The id of a template memory file's content: its path, inode, size and modification time
/// (a template snapshot's memory file is never rewritten; a new generation is a new file).
fn base_id_of(file: &Path) -> Result<String, String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let mut hash = sha2::Sha256::new();
    hash.update(file.as_os_str().as_encoded_bytes());
    hash.update(meta.ino().to_le_bytes());
    hash.update(meta.size().to_le_bytes());
    hash.update(meta.mtime().to_le_bytes());
    hash.update(meta.mtime_nsec().to_le_bytes());
    Ok(hex::encode(&hash.finalize()[..12]))
}
