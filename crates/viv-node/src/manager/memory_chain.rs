//! Memory diff chains of snapshot nodes: a node's `state` keeps only the guest pages that
//! differ from its parent's memory, composed at restore onto a persistent base.
//!
//! A sandbox VM started from a template maps the template's memory file privately; one restored
//! from a chain maps the chain's base. That file's path is recorded in the VM's run directory
//! (`memory-base`). When such a sandbox is saved, QEMU writes its whole memory as before and the
//! node is stored and usable at once: the save does not wait for the diff. A background job
//! (one at a time) then copies the template's memory file once to `memory-bases/<id>.mem`
//! (sparse; the id hashes the file's path, inode, size and time, so a new generation gets a new
//! base), writes a diff ([`viv_vmm::memdiff`]) of the node's state against its parent node's
//! composed memory (its chain: the parent, its `memory.parent`, … up to the base) or, when the
//! parent has no chain on this base or its chain is [`Config::memory_diff_chain`] long, against
//! the base alone (this bounds the depth: a long chain is cut by the next save, never rewritten
//! in place), and installs it: `memory.parent` (when chained), then `memory.base`, then the diff
//! renamed over `state`. The node also keeps the path of the memory file its VM mapped
//! (`memory.source`, recorded whether diffs are on or off), so a sandbox restored from its
//! whole state maps that file privately and loads only the records that differ from it
//! ([`memdiff::OverBase`]: a fork or a resume writes the pages the guest changed, not all its
//! memory), falling back to the whole state on anonymous memory when the file is gone or does
//! not fit, and still saves diffs against the same base.
//!
//! Invariants:
//! - a node is consistent at every instant: a whole state restores alone or as the last part of
//!   a chain (it holds every page), and a diff is renamed in only after the files naming its
//!   chain; readers open a node's `state` *before* reading those files and read the opened file,
//!   so a rename between the two never pairs a diff with a missing chain;
//! - a job's files live in `memory-diffs/` until installed, so a node directory holds only
//!   finished files; a crash or a failed job leaves the whole state; `memory-diffs/` is emptied
//!   at start;
//! - a base is persisted before any node names it in `memory.base`; a job names the base it
//!   is about to use in `memory-diffs/NODE.base`, and the collector keeps every base named there,
//!   by a node or by a run directory;
//! - a node's memory parent is its parent in the snapshot tree, or, for a pause that folds a run
//!   of superseded pauses (`pause_fold.rs`), the run's parent, which becomes its tree parent
//!   when the run is folded; the tree's collector keeps it while the node exists, so a chain
//!   loses a part only by damage; a restore whose chain lacks a
//!   part or has a damaged one fails with a 409 naming that file, before any VM starts.
//!
//! [`Config::memory_diff_chain`]: super::Config::memory_diff_chain

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::Digest as _;
use tokio::sync::Semaphore;
use viv_vmm::memdiff::{self, Chain};

use super::Manager;
use crate::error::ApiError;
use crate::store::Store;

/// The file in a VM's run directory naming the memory file it maps privately.
pub(super) const MEMORY_BASE: &str = "memory-base";
/// A node's base id.
const NODE_BASE: &str = "memory.base";
/// A node's memory parent (absent: a diff against the base alone).
const NODE_PARENT: &str = "memory.parent";
/// The memory file a node's VM mapped (the `memory-base` of its run directory), kept so that a
/// sandbox restored from the node while it is whole still saves diffs against that base.
const NODE_SOURCE: &str = "memory.source";

/// One diff job at a time: each reads a whole state and its parents' into memory.
static DIFF_JOBS: Semaphore = Semaphore::const_new(1);

/// Holds diff jobs off until the permit is dropped (a fold deleting a node; see `pause_fold`).
pub(super) async fn hold_diff_jobs() -> Option<tokio::sync::SemaphorePermit<'static>> {
    DIFF_JOBS.acquire().await.ok()
}

/// What a restore of a node loads.
pub(super) enum NodeMemory {
    /// The node's state holds all its memory (opened: see the module's invariants); `source` is
    /// the memory file its VM mapped, for the restored VM's run directory.
    Whole { file: Arc<File>, source: Option<PathBuf> },
    /// A chain of diffs onto a base the VM maps privately.
    Chain { base: PathBuf, chain: Arc<Chain> },
}

impl Manager {
    fn memory_bases_dir(&self) -> PathBuf {
        self.config.data_dir.join("memory-bases")
    }

    fn memory_diffs_dir(&self) -> PathBuf {
        self.config.data_dir.join("memory-diffs")
    }

    /// Records in `run_dir` which memory file the VM started there maps privately.
    pub(super) fn record_memory_base(&self, run_dir: &Path, file: &Path) {
        if let Err(err) = std::fs::write(run_dir.join(MEMORY_BASE), file.as_os_str().as_encoded_bytes()) {
            tracing::warn!(dir = %run_dir.display(), %err, "recording the VM's memory base; its snapshots keep their whole memory");
        }
        // A later resume or fork of this VM composes over the file: its index is built now, off
        // their path.
        self.base_indexes.warm(file);
    }

    /// What a restore of node `dir` loads: its whole state, or its chain (diffs root first, its
    /// own last) and base. Missing or damaged parts are a 409 naming them.
    pub(super) async fn node_memory(&self, dir: &Path) -> Result<NodeMemory, ApiError> {
        let id = dir.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let snapshots = self.config.data_dir.join("snapshots");
        let bases = self.memory_bases_dir();
        let dir = dir.to_path_buf();
        let opened = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
            // The state first, then the files naming its chain (see the module's invariants).
            let leaf = open_state(&dir, &id)?;
            let Ok(base_id) = std::fs::read_to_string(dir.join(NODE_BASE)) else {
                let source = std::fs::read(dir.join(NODE_SOURCE))
                    .ok()
                    .map(|p| PathBuf::from(String::from_utf8_lossy(&p).into_owned()));
                return Ok(NodeMemory::Whole {
                    file: Arc::new(leaf),
                    source,
                });
            };
            let base = bases.join(format!("{}.mem", base_id.trim()));
            if !base.is_file() {
                return Err(ApiError::Conflict(format!(
                    "snapshot {id} cannot be restored: its memory base {} is missing",
                    base.display()
                )));
            }
            let files = open_chain(&snapshots, &dir, leaf, &id)?;
            let chain = memdiff::read_parts(files)
                .and_then(Chain::from_parts)
                .map_err(|e| ApiError::Conflict(format!("snapshot {id} cannot be restored: {e}")))?;
            Ok(NodeMemory::Chain {
                base,
                chain: Arc::new(chain),
            })
        });
        opened.await.map_err(|e| ApiError::Internal(e.to_string()))?
    }

    /// How node `id` keeps the guest's memory: `diff`, `whole` (also while its diff is being
    /// made) or `none`.
    pub(super) fn node_memory_kind(&self, id: &str) -> &'static str {
        let dir = self.node_dir(id);
        if !dir.join("state").is_file() {
            "none"
        } else if dir.join(NODE_BASE).is_file() && !self.memory_diffs_dir().join(format!("{id}.base")).exists() {
            // Installed, and its job (which records the new size last) is over.
            "diff"
        } else {
            "whole"
        }
    }

    /// Records which memory file the sandbox VM in `run_dir` maps (`memory.source`, which lets
    /// a restore of the whole state load only the pages that differ from it), then queues the
    /// diff of node `node`, just stored with its whole state, whose parent node is `parent`.
    /// Does nothing when the VM maps no memory file; queues nothing when diffs are off.
    pub(super) fn queue_memory_diff(&self, run_dir: &Path, node: &str, parent: Option<&str>) {
        let Ok(mapped) = std::fs::read(run_dir.join(MEMORY_BASE)) else {
            return;
        };
        let work = self.memory_diffs_dir();
        let source = work.join(format!("{node}.source"));
        let recorded = std::fs::create_dir_all(&work).and_then(|()| {
            write_atomically(
                &source,
                &self.node_dir(node).join(NODE_SOURCE),
                &String::from_utf8_lossy(&mapped),
            )
        });
        if let Err(err) = recorded {
            tracing::warn!(node, %err, "recording the node's memory source");
        }
        if self.config.memory_diff_chain == 0 {
            return;
        }
        let job = DiffJob {
            snapshots: self.config.data_dir.join("snapshots"),
            bases: self.memory_bases_dir(),
            work: self.memory_diffs_dir(),
            node: node.to_owned(),
            parent: parent.map(str::to_owned),
            mapped: PathBuf::from(String::from_utf8_lossy(&mapped).into_owned()),
            limit: self.config.memory_diff_chain,
            store: self.store.clone(),
        };
        tokio::spawn(async move {
            let Ok(_turn) = DIFF_JOBS.acquire().await else { return };
            let node = job.node.clone();
            let work = job.work.clone();
            let started = std::time::Instant::now();
            match tokio::task::spawn_blocking(move || job.run()).await {
                Ok(Ok(Some(stats))) => tracing::info!(
                    node,
                    pages = stats.records,
                    kept = stats.kept,
                    bytes = stats.bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "memory saved as a diff"
                ),
                Ok(Ok(None)) => {}
                Ok(Err(err)) => tracing::warn!(node, %err, "memory kept whole: no diff"),
                Err(err) => tracing::warn!(node, %err, "memory kept whole: the diff job failed"),
            }
            for suffix in ["diff", "tmp", "base", "parent", "basename"] {
                let _ = std::fs::remove_file(work.join(format!("{node}.{suffix}")));
            }
        });
    }

    /// At start: removes base copies and diff jobs a crash interrupted (no save runs yet), and
    /// the `memory.parent` of nodes whose diff was not installed.
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
        let _ = std::fs::remove_dir_all(self.memory_diffs_dir());
        let nodes = self.config.data_dir.join("snapshots");
        for entry in std::fs::read_dir(&nodes).into_iter().flatten().flatten() {
            let dir = entry.path();
            if dir.join(NODE_PARENT).exists() && !dir.join(NODE_BASE).exists() {
                let _ = std::fs::remove_file(dir.join(NODE_PARENT));
            }
        }
    }

    /// Removes memory bases that no node, diff job or VM run directory names.
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
        for entry in std::fs::read_dir(self.memory_diffs_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.path().extension().is_some_and(|e| e == "base") {
                if let Ok(id) = std::fs::read_to_string(entry.path()) {
                    used.insert(id.trim().to_owned());
                }
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

/// Opens node `dir`'s state (`leaf` names the node a restore is for, in errors).
fn open_state(dir: &Path, leaf: &str) -> Result<File, ApiError> {
    let state = dir.join("state");
    File::open(&state).map_err(|_| {
        ApiError::Conflict(format!(
            "snapshot {leaf} cannot be restored: part {} of its memory chain is missing",
            state.display()
        ))
    })
}

/// The zero-page indexes of the memory files restores compose over, one per file, built on
/// first use (reading the file once) and kept while the file at that path stays the same
/// (device, inode, length). An index holds no mapping or descriptor, so a deleted template's
/// file is freed at once.
#[derive(Default)]
pub(super) struct BaseIndexes {
    kept: std::sync::Mutex<HashMap<PathBuf, Arc<memdiff::BaseIndex>>>,
    /// Held while an index is built, so that a restore and a warm-up build it once.
    building: std::sync::Mutex<()>,
}

/// Most indexes kept (a `base` template's is 16 KiB): beyond it, those of files gone or
/// replaced are dropped, then any.
const MAX_BASE_INDEXES: usize = 64;

impl BaseIndexes {
    /// Builds the index of `path` in the background unless one is kept that still describes it.
    fn warm(self: &Arc<Self>, path: &Path) {
        if self.kept(path).is_some() {
            return;
        }
        let (indexes, path) = (self.clone(), path.to_path_buf());
        drop(tokio::task::spawn_blocking(move || {
            if let Err(err) = indexes.get(&path) {
                tracing::debug!(%err, "indexing a memory base");
            }
        }));
    }

    /// The index kept for `path`, if it still describes the file there.
    fn kept(&self, path: &Path) -> Option<Arc<memdiff::BaseIndex>> {
        let meta = std::fs::metadata(path).ok()?;
        let kept = self.kept.lock().expect("base indexes lock");
        kept.get(path).filter(|index| index.describes(&meta)).cloned()
    }

    /// The index of `path`, built now (blocking) unless one is kept that still describes it.
    fn get(&self, path: &Path) -> Result<Arc<memdiff::BaseIndex>, memdiff::DiffError> {
        if let Some(index) = self.kept(path) {
            return Ok(index);
        }
        let _building = self.building.lock().expect("base index build lock");
        if let Some(index) = self.kept(path) {
            return Ok(index);
        }
        let started = std::time::Instant::now();
        let index = Arc::new(memdiff::BaseIndex::build(path)?);
        tracing::debug!(base = %path.display(), zero_pages = index.zero_pages(), ms = started.elapsed().as_millis() as u64, "memory base indexed");
        let mut indexes = self.kept.lock().expect("base indexes lock");
        if indexes.len() >= MAX_BASE_INDEXES {
            indexes.retain(|path, index| std::fs::metadata(path).is_ok_and(|meta| index.describes(&meta)));
            if indexes.len() >= MAX_BASE_INDEXES {
                indexes.clear();
            }
        }
        indexes.insert(path.to_path_buf(), index.clone());
        Ok(index)
    }
}

/// Prepares the restore of whole state `file` (the node state at `state`) onto `source`, the
/// memory file its VM mapped: `None`, and the state is loaded whole, when that file is gone or
/// does not fit the state.
pub(super) async fn over_base(
    indexes: &Arc<BaseIndexes>,
    state: &Path,
    file: &Arc<File>,
    source: &Path,
) -> Option<Arc<memdiff::OverBase>> {
    let (indexes, state, file, source) = (indexes.clone(), state.to_path_buf(), file.clone(), source.to_path_buf());
    let opened = tokio::task::spawn_blocking(move || {
        let index = indexes.get(&source)?;
        memdiff::OverBase::open(&state, &file, index)
    })
    .await;
    match opened {
        Ok(Ok(over)) => Some(Arc::new(over)),
        Ok(Err(err)) => {
            tracing::debug!(%err, "loading the whole state: its memory file cannot be its base");
            None
        }
        Err(_) => None,
    }
}

/// The opened state files of node `dir`'s chain, root first; `opened` is `dir`'s own state,
/// already open. Each state is opened before its `memory.parent` is read.
fn open_chain(snapshots: &Path, dir: &Path, opened: File, leaf: &str) -> Result<Vec<(PathBuf, File)>, ApiError> {
    let mut parts = vec![(dir.join("state"), opened)];
    let mut current = dir.to_path_buf();
    while let Ok(parent) = std::fs::read_to_string(current.join(NODE_PARENT)) {
        if parts.len() > 10_000 {
            return Err(ApiError::Internal(format!("the memory chain of snapshot {leaf} loops")));
        }
        current = snapshots.join(parent.trim());
        let file = open_state(&current, leaf)?;
        parts.push((current.join("state"), file));
    }
    parts.reverse();
    Ok(parts)
}

/// Writes `contents` to `to` atomically, through `tmp`.
fn write_atomically(tmp: &Path, to: &Path, contents: &str) -> std::io::Result<()> {
    std::fs::write(tmp, contents)?;
    std::fs::rename(tmp, to)
}

/// A node's diff, made in the background (see the module's doc).
struct DiffJob {
    snapshots: PathBuf,
    bases: PathBuf,
    work: PathBuf,
    node: String,
    parent: Option<String>,
    /// The memory file the node's VM mapped privately.
    mapped: PathBuf,
    limit: usize,
    store: Arc<Store>,
}

impl DiffJob {
    fn run(&self) -> Result<Option<memdiff::DiffStats>, String> {
        let dir = self.snapshots.join(&self.node);
        let state = dir.join("state");
        let (base_id, persisted) = if self.mapped.parent() == Some(self.bases.as_path()) {
            let id = self
                .mapped
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .ok_or("a base without a name")?;
            (id, true)
        } else {
            (base_id_of(&self.mapped)?, false)
        };
        let work = |suffix: &str| self.work.join(format!("{}.{suffix}", self.node));
        std::fs::create_dir_all(&self.work).map_err(|e| e.to_string())?;
        // Named before it is made: the collector keeps it from now on.
        std::fs::write(work("base"), &base_id).map_err(|e| e.to_string())?;
        if !state.is_file() {
            return Ok(None); // deleted meanwhile
        }
        let base = self.bases.join(format!("{base_id}.mem"));
        if !base.is_file() {
            if persisted {
                return Err(format!("memory base {} is gone", base.display()));
            }
            std::fs::create_dir_all(&self.bases).map_err(|e| e.to_string())?;
            let bytes = memdiff::persist_base(&self.mapped, &base).map_err(|e| e.to_string())?;
            tracing::info!(base = %base.display(), bytes, "memory base persisted");
        }
        // The parent's chain, if it is on the same base and not too long.
        let mut chain = Vec::new();
        let mut chained = None;
        if let Some(parent) = &self.parent {
            let parent_dir = self.snapshots.join(parent);
            if let Ok(file) = open_state(&parent_dir, &self.node) {
                let same_base = std::fs::read_to_string(parent_dir.join(NODE_BASE)).is_ok_and(|b| b.trim() == base_id);
                if same_base {
                    if let Ok(files) = open_chain(&self.snapshots, &parent_dir, file, &self.node) {
                        if files.len() < self.limit {
                            chain = memdiff::read_parts(files).map_err(|e| e.to_string())?;
                            chained = Some(parent.clone());
                        }
                    }
                }
            }
        }
        let stats = memdiff::make_diff(&state, &base, &chain, &work("diff")).map_err(|e| e.to_string())?;
        if !state.is_file() {
            return Ok(None); // deleted meanwhile
        }
        // Install: the files naming the chain, then the diff (see the module's invariants).
        if let Some(parent) = &chained {
            write_atomically(&work("parent"), &dir.join(NODE_PARENT), parent).map_err(|e| e.to_string())?;
        }
        write_atomically(&work("basename"), &dir.join(NODE_BASE), &base_id).map_err(|e| e.to_string())?;
        std::fs::rename(work("diff"), &state).map_err(|e| e.to_string())?;
        if let Err(err) = self
            .store
            .set_snapshot_diffed(&self.node, super::snapshots::allocated_bytes(&dir))
        {
            tracing::warn!(node = %self.node, %err, "recording the node's diff and new size");
        }
        Ok(Some(stats))
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
