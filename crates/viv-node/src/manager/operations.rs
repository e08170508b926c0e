//! Asynchronous operations: long storage work (clone, import, wipe) runs in a task of its own
//! and is reported as an [`Operation`] with an id, which `GET /operations/{id}` reads and
//! `GET /operations/{id}/wait` awaits.
//!
//! Invariants:
//! - an operation is registered `running` before its work starts, and ends exactly once, as
//!   `succeeded` (with its result) or `failed` (with an error and the status it would have had),
//!   also when its task panics;
//! - progress only grows, from 0 to 1;
//! - every state change is published on the event bus (kind `operation`), as are progress steps
//!   of at least [`PROGRESS_STEP`];
//! - at most [`MAX_RUNNING`] run at once; more are refused (429) before any work is done;
//! - an operation's id names the node it runs on (`op-NODE-RANDOM` in a cluster, see
//!   [`operation_node`]), so any API server sends requests for it there;
//! - operations live in memory only (a server restart forgets them; the pool removes the
//!   temporary files of work cut short when it opens), and at most [`MAX_FINISHED`] finished
//!   ones are kept, the oldest dropped first.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use viv_api::events::EventKind;
use viv_api::storage::{DiskInfo, Operation, OperationKind, OperationState};

use super::events::Change;
use super::Manager;
use crate::error::ApiError;

/// The node an operation id names (`op-NODE-RANDOM`), if any.
pub fn operation_node(id: &str) -> Option<&str> {
    let (node, random) = id.strip_prefix("op-")?.split_once('-')?;
    let alphanumeric = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric());
    (alphanumeric(node) && alphanumeric(random)).then_some(node)
}

/// Finished operations kept for clients to read.
pub const MAX_FINISHED: usize = 256;

/// Progress steps (of 1) worth an event.
pub const PROGRESS_STEP: f64 = 0.1;

/// Operations that may run at once (each runs `qemu-img`); more are refused with 429.
pub const MAX_RUNNING: usize = 16;

/// The longest `wait` a client may ask for, in seconds.
pub const MAX_WAIT_SECS: u64 = 600;

/// What a successful operation made.
pub enum OperationResult {
    /// A disk made or changed.
    Disk(Box<DiskInfo>),
    /// A VM moved to another server.
    Migration(viv_api::vms::MigrationFigures),
    /// A VM backup.
    Backup(Box<viv_api::backups::VmBackup>),
    /// The disks a restore wrote.
    Disks(Vec<String>),
}

/// The registry of operations.
#[derive(Default)]
pub struct Operations {
    entries: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    /// Registration order, to list and to prune.
    seq: u64,
    sender: watch::Sender<Operation>,
}

/// The running work's side of an operation: it reports progress.
#[derive(Clone)]
pub struct OperationHandle {
    manager: Arc<Manager>,
    sender: watch::Sender<Operation>,
    /// Progress last published as an event.
    published: Arc<Mutex<f64>>,
}

impl OperationHandle {
    /// The manager, for the work to use.
    pub fn manager(&self) -> &Arc<Manager> {
        &self.manager
    }

    /// Reports progress as a fraction from 0 to 1 (smaller values than before are ignored).
    pub fn progress(&self, fraction: f64) {
        let fraction = if fraction.is_finite() {
            fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let mut grew = false;
        self.sender.send_if_modified(|op| {
            if fraction > op.progress && !op.is_done() {
                op.progress = fraction;
                grew = true;
            }
            grew
        });
        if !grew {
            return;
        }
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if fraction - *published >= PROGRESS_STEP {
            *published = fraction;
            drop(published);
            let op = self.sender.borrow().clone();
            self.manager
                .events()
                .publish(change(&op, None, Some(format!("{:.0}%", fraction * 100.0))));
        }
    }
}

fn change(op: &Operation, previous: Option<OperationState>, message: Option<String>) -> Change {
    Change {
        kind: EventKind::Operation,
        id: op.id.clone(),
        name: Some(op.target.clone()),
        state: op.state.as_str().to_owned(),
        previous: previous.map(|p| p.as_str().to_owned()),
        message,
    }
}

impl Manager {
    /// Registers an operation of `kind` on disk `target` and runs `work` in a task of its own;
    /// returns the operation as it starts, or 429 when [`MAX_RUNNING`] already run.
    pub fn start_operation<F, Fut>(
        self: &Arc<Self>,
        kind: OperationKind,
        target: &str,
        work: F,
    ) -> Result<Operation, ApiError>
    where
        F: FnOnce(OperationHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<DiskInfo, ApiError>> + Send + 'static,
    {
        self.start_operation_with(kind, target, move |handle| {
            let work = work(handle);
            async move { work.await.map(|disk| OperationResult::Disk(Box::new(disk))) }
        })
    }

    /// [`Manager::start_operation`] for work whose result is not a disk.
    pub fn start_operation_with<F, Fut>(
        self: &Arc<Self>,
        kind: OperationKind,
        target: &str,
        work: F,
    ) -> Result<Operation, ApiError>
    where
        F: FnOnce(OperationHandle) -> Fut + Send + 'static,
        Fut: Future<Output = Result<OperationResult, ApiError>> + Send + 'static,
    {
        let op = Operation {
            id: match self.node_id() {
                "" => format!("op-{}", super::random_id(16)),
                node => format!("op-{node}-{}", super::random_id(16)),
            },
            kind,
            target: target.to_owned(),
            state: OperationState::Running,
            progress: 0.0,
            error: None,
            error_code: None,
            result: None,
            migration: None,
            backup: None,
            disks: None,
            created_at: crate::store::now_rfc3339_ms(),
            finished_at: None,
        };
        let (sender, _) = watch::channel(op.clone());
        self.operations.insert(&op.id, sender.clone())?;
        self.events().publish(change(&op, None, None));
        tracing::info!(operation = %op.id, kind = kind.as_str(), target, "operation started");
        let handle = OperationHandle {
            manager: self.clone(),
            sender: sender.clone(),
            published: Arc::new(Mutex::new(0.0)),
        };
        let manager = self.clone();
        tokio::spawn(async move {
            let outcome = match tokio::spawn(work(handle)).await {
                Ok(outcome) => outcome,
                Err(e) => Err(ApiError::Internal(format!("the operation's task failed: {e}"))),
            };
            sender.send_modify(|op| {
                op.finished_at = Some(crate::store::now_rfc3339_ms());
                match outcome {
                    Ok(result) => {
                        op.state = OperationState::Succeeded;
                        op.progress = 1.0;
                        match result {
                            OperationResult::Disk(disk) => op.result = Some(*disk),
                            OperationResult::Migration(figures) => op.migration = Some(figures),
                            OperationResult::Backup(backup) => op.backup = Some(*backup),
                            OperationResult::Disks(disks) => op.disks = Some(disks),
                        }
                    }
                    Err(e) => {
                        op.state = OperationState::Failed;
                        op.error_code = Some(e.status().as_u16());
                        op.error = Some(e.to_string());
                    }
                }
            });
            let op = sender.borrow().clone();
            tracing::info!(operation = %op.id, state = op.state.as_str(), error = ?op.error, "operation ended");
            manager
                .events()
                .publish(change(&op, Some(OperationState::Running), op.error.clone()));
            manager.operations.prune();
        });
        Ok(op)
    }

    /// 429 when no operation may start now.
    pub fn check_operation_room(&self) -> Result<(), ApiError> {
        self.operations.check_room(&self.operations.lock())
    }

    /// Every operation kept, oldest first.
    pub fn list_operations(&self) -> Vec<Operation> {
        let entries = self.operations.lock();
        let mut ops: Vec<(u64, Operation)> = entries.values().map(|e| (e.seq, e.sender.borrow().clone())).collect();
        ops.sort_by_key(|(seq, _)| *seq);
        ops.into_iter().map(|(_, op)| op).collect()
    }

    /// One operation.
    pub fn operation(&self, id: &str) -> Result<Operation, ApiError> {
        Ok(self.operations.sender(id)?.borrow().clone())
    }

    /// The operation once it has ended, or as it is after `timeout`.
    pub async fn wait_operation(&self, id: &str, timeout: Duration) -> Result<Operation, ApiError> {
        let mut rx = self.operations.sender(id)?.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(Operation::is_done)).await;
        let op = rx.borrow().clone();
        Ok(op)
    }
}

impl Operations {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_room(&self, entries: &HashMap<String, Entry>) -> Result<(), ApiError> {
        let running = entries.values().filter(|e| !e.sender.borrow().is_done()).count();
        if running >= MAX_RUNNING {
            return Err(ApiError::NoRoom(format!(
                "{running} storage operations are running, the most at once; wait for one to end (GET /operations)"
            )));
        }
        Ok(())
    }

    fn insert(&self, id: &str, sender: watch::Sender<Operation>) -> Result<(), ApiError> {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut entries = self.lock();
        self.check_room(&entries)?;
        entries.insert(id.to_owned(), Entry { seq, sender });
        Ok(())
    }

    fn sender(&self, id: &str) -> Result<watch::Sender<Operation>, ApiError> {
        self.lock().get(id).map(|e| e.sender.clone()).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no operation '{id}' (finished operations are kept until the server restarts, at most {MAX_FINISHED})"
            ))
        })
    }

    /// Drops the oldest finished operations beyond [`MAX_FINISHED`].
    fn prune(&self) {
        let mut entries = self.lock();
        let mut finished: Vec<(u64, String)> = entries
            .iter()
            .filter(|(_, e)| e.sender.borrow().is_done())
            .map(|(id, e)| (e.seq, id.clone()))
            .collect();
        if finished.len() <= MAX_FINISHED {
            return;
        }
        finished.sort();
        let excess = finished.len() - MAX_FINISHED;
        for (_, id) in finished.into_iter().take(excess) {
            entries.remove(&id);
        }
    }
}

#[cfg(test)]
mod id_tests {
    #[test]
    fn operation_ids_name_their_node() {
        assert_eq!(super::operation_node("op-abc123def456-x9y8z7"), Some("abc123def456"));
        for no_node in ["op-x9y8z7", "op--x", "op-a-", "op-a/b-c", "node-a-b", "op-a-b-c"] {
            assert_eq!(super::operation_node(no_node), None, "{no_node}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(id: &str) -> watch::Sender<Operation> {
        watch::channel(Operation {
            id: id.into(),
            kind: OperationKind::Clone,
            target: "d".into(),
            state: OperationState::Running,
            progress: 0.0,
            error: None,
            error_code: None,
            result: None,
            migration: None,
            backup: None,
            disks: None,
            created_at: String::new(),
            finished_at: None,
        })
        .0
    }

    fn finish(sender: &watch::Sender<Operation>) {
        sender.send_modify(|o| o.state = OperationState::Succeeded);
    }

    #[test]
    fn at_most_max_running_run_at_once() {
        let ops = Operations::default();
        let senders: Vec<_> = (0..MAX_RUNNING).map(|i| op(&format!("op-{i}"))).collect();
        for (i, s) in senders.iter().enumerate() {
            ops.insert(&format!("op-{i}"), s.clone()).unwrap();
        }
        let refused = ops.insert("op-more", op("op-more")).unwrap_err();
        assert_eq!(refused.status().as_u16(), 429, "{refused}");
        finish(&senders[0]);
        ops.insert("op-more", op("op-more")).unwrap();
    }

    #[test]
    fn only_the_newest_finished_are_kept() {
        let ops = Operations::default();
        for i in 0..MAX_FINISHED + 5 {
            let sender = op(&format!("op-{i}"));
            finish(&sender);
            ops.insert(&format!("op-{i}"), sender).unwrap();
        }
        let running = op("op-running");
        ops.insert("op-running", running).unwrap();
        ops.prune();
        let entries = ops.lock();
        assert_eq!(entries.len(), MAX_FINISHED + 1);
        assert!(!entries.contains_key("op-0") && !entries.contains_key("op-4"));
        assert!(entries.contains_key("op-5") && entries.contains_key("op-running"));
    }
}
