//! Superseded pause nodes folded into the pause that replaces them.
//!
//! A sandbox paused, resumed and paused again gets a new pause node whose disk layer is backed
//! by the previous node's layer. Left alone, every cycle would add a link to the disk's backing
//! chain (QEMU opens every link at each restore, so resumes slow down with every cycle, and a
//! chain deeper than 256 links is refused) and keep the previous node's memory for as long as
//! the sandbox lives. The same holds for the node of a fork once its children are gone. A pause
//! or fork node taken of a sandbox that nothing but that sandbox uses (no other child, no other
//! sandbox, no copies on other servers, its files here) is *superseded* by the sandbox's next
//! pause, and so is the run of such nodes above it (named snapshots are never folded). With memory diffs off (the default)
//! a pause folds that whole run away; with `--memory-diff-chain N` it lets the run grow to N
//! nodes (their diffs form the new node's memory chain) and folds it when it is that long, so
//! neither chain outgrows N. The new node's memory is then taken against the run's parent
//! (`Manager::pause_keeping`). Once the new node is stored, a background task that holds the
//! sandbox's resume gate folds the run, nearest node first; for each node it
//! 1. deletes the node's saved state;
//! 2. commits the new layer's clusters into the node's layer (`qemu-img commit -d`, which leaves
//!    the new layer as it is; every cluster the new layer holds shadows the one written below
//!    it, so the new node's disk reads the same at every instant);
//! 3. renames that merged layer over the new node's `disk.qcow2` (its backing file is then the
//!    node's parent's layer, or the template's), and syncs both directories;
//! 4. makes the new node a child of the node's parent and deletes the node.
//!
//! Invariants:
//! - a folded node's state is gone before its layer changes, so no restore ever pairs that
//!   state with a changed disk; memory diff jobs are held off meanwhile, so none installs a
//!   state in it again;
//! - no node's memory names a node of the run: the new node's diff is taken against the run's
//!   parent, and each node of the run is the only child of the next;
//! - nothing starts from a node being folded: a create from a pause or fork node and a fork
//!   take the sandbox's gate too (`Manager::hold_folds`), so they wait for a fold under way, or
//!   register their sandbox as the node's user before a fold checks it;
//! - in a cluster the pause waits for the fold before it copies the new node to other servers
//!   (`--pause-replicas`), so no copy is taken of a layer being merged; moves of paused
//!   sandboxes take the resume gate;
//! - a crash or a failure at any step leaves the new node restorable: before step 3 its layer
//!   still reads through the node's (then a link without state, which the collector takes with
//!   the new node), after it the node is an empty row (no layer, no state) until step 4; the
//!   next pause of the sandbox folds such a row with step 4 alone.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Manager;
use crate::store::{SandboxRow, SnapshotKind, SnapshotRow, Store, StoreError};

/// Longest run of superseded pauses one pause folds (a deeper chain is left to later pauses).
const MAX_RUN: usize = 512;

impl Manager {
    /// The pause and fork nodes sandbox `row`'s next pause folds away, nearest first (see the
    /// module's doc); checked before that pause stores its node.
    pub(super) fn superseded_pauses(&self, row: &SandboxRow) -> Vec<SnapshotRow> {
        let snapshots = self.config.data_dir.join("snapshots");
        let mut run: Vec<SnapshotRow> = Vec::new();
        let mut next = row.snapshot_id.clone();
        while let Some(id) = next.take() {
            let Ok(Some(node)) = self.store.snapshot(&id) else {
                break;
            };
            let below = run.last().map(|n| n.id.as_str());
            let foldable = only_needed_by(&self.store, &snapshots, &node, &row.id, below).unwrap_or(false);
            if !foldable || run.len() == MAX_RUN {
                break;
            }
            next = node.parent_id.clone();
            run.push(node);
        }
        let limit = self.config.memory_diff_chain;
        if limit > 0 && run.len() < limit {
            return Vec::new();
        }
        run
    }

    /// Folds `run` (nearest first), superseded by `new` (just stored by a pause of `sandbox`),
    /// away in the background. The sandbox's resume gate is taken before this returns when it
    /// is free (it is, unless a resume that found the sandbox running still holds it), so a
    /// resume asked for after the pause answered waits for the fold instead of racing it.
    /// Returns the fold's task, when there is one.
    pub(super) fn fold_superseded(
        &self,
        sandbox: &str,
        run: Vec<SnapshotRow>,
        new: &SnapshotRow,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if run.is_empty() {
            return None;
        }
        let gate = self.resume_gates.gate(sandbox);
        let gate = gate.clone().try_lock_owned().map_err(|_| gate);
        self.fold_holding(sandbox, run, new, gate)
    }

    /// [`Manager::fold_superseded`] by the holder of the sandbox's resume gate (`held`), which
    /// passes it on to the fold, so no resume comes between them.
    pub(super) fn fold_superseded_holding(
        &self,
        sandbox: &str,
        run: Vec<SnapshotRow>,
        new: &SnapshotRow,
        held: tokio::sync::OwnedMutexGuard<()>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        if run.is_empty() {
            return None;
        }
        self.fold_holding(sandbox, run, new, Ok(held))
    }

    /// Spawns the fold, which holds the sandbox's resume gate: `Ok` a guard of it already
    /// taken, `Err` the gate to wait for.
    fn fold_holding(
        &self,
        sandbox: &str,
        run: Vec<SnapshotRow>,
        new: &SnapshotRow,
        gate: Result<tokio::sync::OwnedMutexGuard<()>, Arc<tokio::sync::Mutex<()>>>,
    ) -> Option<tokio::task::JoinHandle<()>> {
        let fold = Fold {
            store: self.store.clone(),
            snapshots: self.config.data_dir.join("snapshots"),
            sandbox: sandbox.to_owned(),
            new: new.id.clone(),
        };
        Some(tokio::spawn(async move {
            let _gate = match gate {
                Ok(held) => held,
                Err(gate) => gate.lock_owned().await,
            };
            let started = std::time::Instant::now();
            let new = fold.new.clone();
            let _no_diffs = super::memory_chain::hold_diff_jobs().await;
            let mut folded = 0;
            for old in &run {
                match fold.still_superseded(old) {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::debug!(snapshot = %new, kept = %old.id, "pause not folded: in use");
                        break;
                    }
                    Err(err) => {
                        tracing::warn!(snapshot = %new, kept = %old.id, %err, "folding a superseded pause");
                        break;
                    }
                }
                if let Err(err) = fold.fold_once(old).await {
                    tracing::warn!(snapshot = %new, kept = %old.id, %err, "folding a superseded pause");
                    break;
                }
                folded += 1;
            }
            if folded > 0 {
                tracing::info!(
                    snapshot = %new,
                    nodes = folded,
                    ms = started.elapsed().as_millis() as u64,
                    "superseded pauses folded"
                );
            }
        }))
    }

    /// Holds off the folds of the sandbox that pause or fork node `node` was taken of, while a
    /// new sandbox starts from that node: the start waits for a fold under way and, once it
    /// holds the gate, the sandbox it registers makes the node (or the run under it) in use, so
    /// no later fold takes it. `None` for other nodes, which are never folded.
    pub(super) async fn hold_folds(&self, node: &SnapshotRow) -> Option<tokio::sync::OwnedMutexGuard<()>> {
        if !may_fold(node.kind) {
            return None;
        }
        Some(self.hold_folds_of(&node.sandbox_id).await)
    }

    /// Holds off the folds of sandbox `sandbox`'s nodes (a fork holds them until its children
    /// use its new node): the fold task of a pause takes the same gate.
    pub(super) async fn hold_folds_of(&self, sandbox: &str) -> tokio::sync::OwnedMutexGuard<()> {
        self.resume_gates.gate(sandbox).lock_owned().await
    }
}

/// One fold, with what it needs from the manager.
struct Fold {
    store: Arc<Store>,
    snapshots: PathBuf,
    sandbox: String,
    /// The node superseding the run.
    new: String,
}

impl Fold {
    /// Folds node `old` into the new node, its child (steps 1–4 of the module's doc).
    async fn fold_once(&self, old: &SnapshotRow) -> Result<(), String> {
        let old_dir = self.snapshots.join(&old.id);
        let new_dir = self.snapshots.join(&self.new);
        for leaf in ["state", super::lifecycle::DISK_ONLY] {
            match std::fs::remove_file(old_dir.join(leaf)) {
                Ok(()) => {}
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
                Err(err) => return Err(format!("removing the state of {}: {err}", old.id)),
            }
        }
        let top = new_dir.join("disk.qcow2");
        if !has_layer(&old_dir) {
            // A fold a crash interrupted after step 3: the new node's disk is merged already.
            return self.forget(old, &new_dir, &old_dir);
        }
        let args: Vec<std::ffi::OsString> = vec![
            "commit".into(),
            "-q".into(),
            "-d".into(),
            "-f".into(),
            "qcow2".into(),
            top.clone().into(),
        ];
        viv_storage::qemu_img::run(&args).await.map_err(|e| e.to_string())?;
        let merged = old_dir.join("disk.qcow2");
        viv_vmm::sync_file(&merged)
            .await
            .map_err(|e| format!("syncing {}: {e}", merged.display()))?;
        std::fs::rename(&merged, &top).map_err(|e| format!("moving {} to {}: {e}", merged.display(), top.display()))?;
        // The rename is on the disk before the store forgets the old node (whose directory goes).
        for dir in [&new_dir, &old_dir] {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("syncing {}: {e}", dir.display()))?;
        }
        self.forget(old, &new_dir, &old_dir)
    }

    /// Step 4: the new node becomes a child of `old`'s parent, and `old` goes.
    fn forget(&self, old: &SnapshotRow, new_dir: &Path, old_dir: &Path) -> Result<(), String> {
        let bytes = super::snapshots::allocated_bytes(new_dir);
        self.store
            .reparent_snapshot(&self.new, old.parent_id.as_deref(), bytes)
            .map_err(|e| e.to_string())?;
        self.store.delete_snapshot(&old.id).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(old_dir);
        Ok(())
    }

    /// Whether, under the gate, the sandbox is still paused in the new node, which is still the
    /// only user of `old`, its parent.
    fn still_superseded(&self, old: &SnapshotRow) -> Result<bool, StoreError> {
        // A sandbox resumed meanwhile reads the old layer in its QEMU: it is left as it is.
        let paused_here = self.store.sandbox(&self.sandbox)?.is_some_and(|row| {
            row.state == viv_api::SandboxState::Paused && row.snapshot_id.as_deref() == Some(self.new.as_str())
        });
        let child = self
            .store
            .snapshot(&self.new)?
            .is_some_and(|node| node.parent_id.as_deref() == Some(old.id.as_str()));
        Ok(paused_here && child && only_needed_by(&self.store, &self.snapshots, old, &self.sandbox, Some(&self.new))?)
    }
}

/// Whether `node` is a pause or fork node taken of `sandbox` that nothing needs but its one
/// child node `child` or, without one, the sandbox itself (running from it), with its files on
/// this server and no copies on others: a node a pause of `sandbox` may fold away.
fn only_needed_by(
    store: &Store,
    snapshots: &Path,
    node: &SnapshotRow,
    sandbox: &str,
    child: Option<&str>,
) -> Result<bool, StoreError> {
    let dir = snapshots.join(&node.id);
    let (children, sandboxes) = store.snapshot_users(&node.id)?;
    let users_ok = match child {
        None => children.is_empty() && sandboxes == [sandbox],
        Some(child) => children == [child] && sandboxes.is_empty(),
    };
    let local = match store.snapshot_node(&node.id)? {
        Some(Some(owner)) => store.node_id() == Some(owner.as_str()),
        Some(None) => true,
        None => false,
    };
    Ok(may_fold(node.kind)
        && node.sandbox_id == sandbox
        && users_ok
        && local
        && store.snapshot_replicas(&node.id)?.is_empty()
        && (has_layer(&dir) || interrupted_fold(&dir, child)))
}

/// Whether nodes of `kind` are ever folded: pause and fork nodes are; named snapshots never.
fn may_fold(kind: SnapshotKind) -> bool {
    matches!(kind, SnapshotKind::Pause | SnapshotKind::Fork)
}

fn has_layer(dir: &Path) -> bool {
    dir.join("disk.qcow2").is_file()
}

/// Whether node directory `dir`, under node `child`, is what a fold a crash interrupted after
/// step 3 leaves: no layer (merged into the child's) and no state.
fn interrupted_fold(dir: &Path, child: Option<&str>) -> bool {
    child.is_some() && !dir.join("state").exists()
}
