//! Parked VMs: a paused sandbox's VM kept, stopped, for a while after the pause
//! (`--pause-keep-warm`), so that a resume soon after continues that VM instead of starting a
//! new QEMU from the node.
//!
//! A pause that parks saves the sandbox as any pause does (the node holds the disk layer and the
//! whole state, on disk before the pause answers), but instead of killing the VM it moves the VM
//! onto a new overlay over the node's layer, as a fork does, and leaves its vCPUs stopped. A
//! resume within the keep-warm time lets them run again: the guest's processes, page cache and
//! QEMU's translated code are warm, and no state is loaded. The agent's connection is not hung up
//! (the guest's virtio-serial port blocks the agent's writes while no host is connected, and a
//! reconnect after `cont` went unanswered): streams open at the pause, such as a command's
//! output, stall while the VM is parked and go on after the resume. After that time the VM is
//! *evicted*: killed (which ends those streams), its network slot and run directory freed, and
//! a resume restores the node as usual.
//!
//! Invariants:
//! - a parked VM is stopped from its save until its resume or eviction, so it never differs
//!   from its node; it is parked only while its sandbox's row says paused on that node, and
//!   resumes, evictions and kills of a paused sandbox happen under its resume gate;
//! - no fold touches a parked VM's chain. The pause that parks puts its fold off to the eviction
//!   (which passes the gate on to the fold, so no resume comes between them); a resume of the
//!   parked VM drops it, and the sandbox's next pause finds that run again, one node longer. A
//!   pause parks only while that run is shorter than [`MAX_PARKED_RUN`], so chains stay short;
//! - a parked VM whose QEMU died is never resumed: the resume restores the node instead;
//! - parked VMs are evicted when the host lacks room for a new VM, when their sandbox is killed
//!   and at shutdown; after a crash the next server kills them as orphans (their sandboxes are
//!   paused, so none claims them);
//! - nothing is parked on a server whose store is shared (PostgreSQL): another node may resume,
//!   move or copy its paused sandboxes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{remove_files, LiveSandbox, Manager};
use crate::store::SnapshotRow;
use viv_api::SandboxState;

/// Longest run of unfolded pause nodes under a pause that parks (each resume of a parked VM
/// adds one): past it the pause stops the VM and folds the run.
const MAX_PARKED_RUN: usize = 16;

/// One parked VM.
struct Parked {
    live: Arc<LiveSandbox>,
    /// The node its sandbox is paused on.
    node: SnapshotRow,
    /// The superseded pause nodes whose fold waits for the eviction (nearest first).
    run: Vec<SnapshotRow>,
    since: Instant,
}

/// The parked VMs of this server, by sandbox id.
#[derive(Default)]
pub(super) struct ParkedVms {
    vms: Mutex<HashMap<String, Parked>>,
    sweeping: AtomicBool,
    /// Resumes that continued a parked VM.
    resumed: AtomicU64,
    /// Parked VMs evicted (keep-warm time over, room needed, sandbox killed, shutdown).
    evicted: AtomicU64,
}

impl ParkedVms {
    fn take(&self, id: &str) -> Option<Parked> {
        self.vms.lock().expect("parked lock").remove(id)
    }

    /// Number of parked VMs.
    fn count(&self) -> usize {
        self.vms.lock().expect("parked lock").len()
    }
}

impl Manager {
    /// Whether a pause that keeps memory parks the VM, given the run of superseded nodes it
    /// would fold.
    pub(super) fn may_park(&self, run: &[SnapshotRow]) -> bool {
        // A store of its own: no other node resumes, moves or copies this server's paused
        // sandboxes.
        let alone = self.store.postgres_url().is_none();
        !self.config.pause_keep_warm.is_zero() && alone && run.len() < MAX_PARKED_RUN
    }

    /// Parks the stopped VM of `live`, just paused on `node`, with the fold of `run` put off.
    pub(super) fn park(&self, live: Arc<LiveSandbox>, node: &SnapshotRow, run: Vec<SnapshotRow>) {
        let parked = Parked {
            live,
            node: node.clone(),
            run,
            since: Instant::now(),
        };
        let previous = self
            .parked
            .vms
            .lock()
            .expect("parked lock")
            .insert(node.sandbox_id.clone(), parked);
        if let Some(previous) = previous {
            // Cannot happen (a sandbox is resumed before it pauses again); never leak a QEMU.
            tracing::warn!(sandbox = %node.sandbox_id, "a second VM parked for one sandbox; killing the first");
            let live = previous.live;
            tokio::spawn(async move { live.vm.kill().await });
        }
    }

    /// The parked VM of paused sandbox `id`, running again, if it was parked on `node` and its
    /// QEMU is alive; the caller holds the sandbox's resume gate. Otherwise the parked VM (if
    /// any) is discarded, and the caller restores the node.
    pub(super) async fn unpark(&self, id: &str, node: &str) -> Option<Arc<LiveSandbox>> {
        let parked = self.parked.take(id)?;
        let alive = parked.live.vm.exit().borrow().is_none();
        if !alive || parked.node.id != node {
            tracing::warn!(sandbox = %id, alive, "the parked VM cannot be resumed; restoring its node");
            self.discard(parked.live).await;
            return None;
        }
        if let Err(err) = parked.live.vm.resume().await {
            tracing::warn!(sandbox = %id, error = %err, "resuming the parked VM failed; restoring its node");
            self.discard(parked.live).await;
            return None;
        }
        // The agent's connection stayed open through the park; it answers once the VM runs.
        if let Err(err) = parked.live.agent.wait_ready(self.config.boot_timeout).await {
            tracing::warn!(sandbox = %id, error = %err, "the parked VM's agent did not answer; restoring its node");
            self.discard(parked.live).await;
            return None;
        }
        self.parked.resumed.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(sandbox = %id, parked_ms = parked.since.elapsed().as_millis() as u64, "resuming a parked VM");
        Some(parked.live)
    }

    /// Evicts the parked VM of sandbox `id`, if there is one: kills it and frees what it held.
    /// The fold the pause put off is left to the sandbox's next pause (the sandbox is going).
    pub(super) async fn discard_parked_of(&self, id: &str) {
        if let Some(parked) = self.parked.take(id) {
            self.discard(parked.live).await;
        }
    }

    /// Evicts parked VMs: those parked longer than the keep-warm time, or (`all`) every one whose
    /// sandbox is not being resumed right now. Each eviction folds what its pause put off.
    pub(super) async fn evict_parked(&self, all: bool) -> usize {
        let keep = self.config.pause_keep_warm;
        let due: Vec<String> = self
            .parked
            .vms
            .lock()
            .expect("parked lock")
            .iter()
            .filter(|(_, p)| all || p.since.elapsed() >= keep)
            .map(|(id, _)| id.clone())
            .collect();
        let mut evicted = 0;
        for id in due {
            let gate = self.resume_gates.gate(&id);
            // A resume holding the gate takes the VM itself; it is not waited for.
            let Ok(held) = gate.try_lock_owned() else { continue };
            let Some(parked) = self.parked.take(&id) else { continue };
            let Parked { live, node, run, .. } = parked;
            self.discard(live).await;
            evicted += 1;
            let paused_here =
                self.store.sandbox(&id).ok().flatten().is_some_and(|row| {
                    row.state == SandboxState::Paused && row.snapshot_id.as_deref() == Some(&node.id)
                });
            if paused_here {
                self.fold_superseded_holding(&id, run, &node, held);
            }
        }
        evicted
    }

    /// The parked VMs' metrics in the Prometheus text format.
    pub fn render_parked_metrics(&self) -> String {
        format!(
            "# HELP vivarium_sandboxes_parked Paused sandboxes whose stopped VM is kept for a quick resume (--pause-keep-warm).\n# TYPE vivarium_sandboxes_parked gauge\nvivarium_sandboxes_parked {}\n\
             # HELP vivarium_parked_resumes_total Resumes that continued a parked VM instead of restoring its node.\n# TYPE vivarium_parked_resumes_total counter\nvivarium_parked_resumes_total {}\n\
             # HELP vivarium_parked_evictions_total Parked VMs killed (keep-warm time over, room needed, sandbox killed, shutdown).\n# TYPE vivarium_parked_evictions_total counter\nvivarium_parked_evictions_total {}\n",
            self.parked.count(),
            self.parked.resumed.load(Ordering::Relaxed),
            self.parked.evicted.load(Ordering::Relaxed),
        )
    }

    /// Starts the task that evicts parked VMs once their keep-warm time is over (once).
    pub fn start_parked_sweeper(self: &Arc<Self>) {
        let keep = self.config.pause_keep_warm;
        if keep.is_zero() || self.parked.sweeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let manager = Arc::downgrade(self);
        let stopping = self.stopping();
        let every = (keep / 4).clamp(Duration::from_millis(100), Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while super::stopping::next_tick(&mut tick, &stopping).await {
                let Some(manager) = manager.upgrade() else { return };
                let evicted = manager.evict_parked(false).await;
                if evicted > 0 {
                    tracing::debug!(evicted, "parked VMs evicted after the keep-warm time");
                }
            }
        });
    }

    /// Kills every parked VM (at shutdown: their sandboxes stay paused on their nodes, and the
    /// put-off folds are left to their next pauses).
    pub(super) async fn discard_parked(&self) {
        let all: Vec<Parked> = self
            .parked
            .vms
            .lock()
            .expect("parked lock")
            .drain()
            .map(|(_, p)| p)
            .collect();
        for parked in all {
            self.discard(parked.live).await;
        }
    }

    /// Kills a parked VM and frees its network slot and run directory.
    async fn discard(&self, live: Arc<LiveSandbox>) {
        tracing::debug!(sandbox = %live.id, "evicting a parked VM");
        self.parked.evicted.fetch_add(1, Ordering::Relaxed);
        if let Err(err) = live.vm.kill().await {
            tracing::warn!(sandbox = %live.id, error = %err, "killing a parked VM");
        }
        live.release_network().await;
        remove_files(&live.run_dir, &live.memory_file);
    }
}
