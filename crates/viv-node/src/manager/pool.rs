//! Warm sandboxes: VMs restored from a template snapshot ahead of time, their agent answering
//! and a first command already run (under TCG a freshly restored VM pays for an empty
//! translation cache on its first command), so that a create only has to initialize the agent.
//!
//! The pool of each template snapshot sizes itself to recent demand: its target is the number
//! of creates that asked for a warm VM of it within the last `pool_window`, no less than
//! `pool_size` and no more than `pool_max`; VMs beyond `pool_size` are warmed only while the
//! host has room for one more VM (the admission check of creates), and a VM beyond `pool_size`
//! that no create took for `pool_idle` is killed, so a burst grows the pool and a quiet spell
//! shrinks it back.
//!
//! Invariants:
//! - a pooled VM has a run directory like a sandbox's (named by the id the sandbox will get) but
//!   no row; it becomes a sandbox only through [`Manager::take_pooled`], which removes it from
//!   the pool first, so no VM is handed out twice (expiry removes a VM under the same lock
//!   before it kills it);
//! - the pool of one template snapshot (template and VM shape) is refilled in the background
//!   after every create from it, up to its target (one filler per snapshot at a time); pools of
//!   a template that is rebuilt or deleted are emptied, since their disks sit on the old
//!   snapshot;
//! - the newest warm VM is handed out first, so the ones that waited longest are the ones that
//!   expire;
//! - a warm VM runs at a low CPU weight from its restore until a create takes it, which puts
//!   its weight back before the sandbox is handed out ([`super::pool_cpu`]);
//! - pooled VMs are killed at shutdown; their run directories have no row, so a server that
//!   crashed removes them at its next start.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use viv_proto::process::{ProcessConfig, StartRequest};

use super::templates::Recipe;
use super::{remove_files, LiveSandbox, Manager, Origin};
use crate::error::ApiError;

/// How the pool sizes itself (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolPolicy {
    /// Warm VMs always kept per template snapshot once it was used (0 disables the pool).
    pub min: usize,
    /// Most warm VMs per template snapshot, however many creates came.
    pub max: usize,
    /// How far back creates count as demand.
    pub window: Duration,
    /// How long a warm VM beyond `min` may wait for a create before it is killed.
    pub idle: Duration,
}

impl PoolPolicy {
    /// The target size for `demand` creates within the window.
    pub fn target(&self, demand: usize) -> usize {
        if self.min == 0 {
            return 0;
        }
        demand.clamp(self.min, self.max.max(self.min))
    }
}

/// Warm VMs by template snapshot key.
#[derive(Default)]
pub struct Pool {
    ready: Mutex<HashMap<String, PoolEntry>>,
    filling: Mutex<HashSet<String>>,
    /// When creates asked for a warm VM, by template snapshot key (within the window).
    demand: Mutex<HashMap<String, VecDeque<Instant>>>,
    /// Set when the server stops: no VM is warmed any more (one being warmed still joins the
    /// pool, which `close_pool` empties once no filling is left).
    closing: AtomicBool,
    /// Whether the task that expires idle VMs runs.
    sweeping: AtomicBool,
    /// Creates served by a warm VM, creates that found none, VMs killed for idling.
    hits: AtomicU64,
    misses: AtomicU64,
    expired: AtomicU64,
}

#[derive(Default)]
struct PoolEntry {
    /// The template the VMs are of.
    template: String,
    /// Oldest first.
    vms: Vec<Warm>,
}

/// A VM waiting in the pool.
struct Warm {
    live: Arc<LiveSandbox>,
    /// When it joined the pool.
    since: Instant,
    /// Its CPU weight before it was lowered for the wait (see [`super::pool_cpu`]).
    weight: Option<super::pool_cpu::SavedWeight>,
}

impl Pool {
    /// The templates that have warm VMs.
    pub(super) fn templates(&self) -> std::collections::HashSet<String> {
        self.ready
            .lock()
            .expect("pool lock")
            .values()
            .map(|e| e.template.clone())
            .collect()
    }

    /// Number of warm VMs.
    pub fn ready_count(&self) -> usize {
        self.ready
            .lock()
            .expect("pool lock")
            .values()
            .map(|e| e.vms.len())
            .sum()
    }

    /// Number of template snapshots whose pool is being filled now.
    pub fn warming_count(&self) -> usize {
        self.filling.lock().expect("pool lock").len()
    }

    /// The pool's counters in the Prometheus text format.
    pub fn render_metrics(&self) -> String {
        format!(
            "# HELP vivarium_pool_ready Warm VMs in the pool.\n# TYPE vivarium_pool_ready gauge\nvivarium_pool_ready {}\n\
             # HELP vivarium_pool_hits_total Creates served by a warm VM.\n# TYPE vivarium_pool_hits_total counter\nvivarium_pool_hits_total {}\n\
             # HELP vivarium_pool_misses_total Creates that asked for a warm VM and found none.\n# TYPE vivarium_pool_misses_total counter\nvivarium_pool_misses_total {}\n\
             # HELP vivarium_pool_expired_total Warm VMs killed after idling beyond the pool's minimum.\n# TYPE vivarium_pool_expired_total counter\nvivarium_pool_expired_total {}\n",
            self.ready_count(),
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            self.expired.load(Ordering::Relaxed),
        )
    }

    /// Records a create that asked for a warm VM of `key` and returns the creates within
    /// `window` (this one included).
    fn record_demand(&self, key: &str, window: Duration) -> usize {
        let mut demand = self.demand.lock().expect("pool lock");
        let times = demand.entry(key.to_owned()).or_default();
        let now = Instant::now();
        times.push_back(now);
        prune(times, now, window);
        times.len()
    }

    /// The creates of `key` within `window`.
    fn demand(&self, key: &str, window: Duration) -> usize {
        let mut demand = self.demand.lock().expect("pool lock");
        let Some(times) = demand.get_mut(key) else { return 0 };
        prune(times, Instant::now(), window);
        times.len()
    }
}

/// Drops the times older than `window` before `now`.
fn prune(times: &mut VecDeque<Instant>, now: Instant, window: Duration) {
    while times.front().is_some_and(|t| now.duration_since(*t) > window) {
        times.pop_front();
    }
}

impl Manager {
    /// A warm VM of this template snapshot, if one is ready; counts the create as demand.
    pub(super) fn take_pooled(&self, key: &str) -> Option<Arc<LiveSandbox>> {
        self.pool.record_demand(key, self.config.pool.window);
        loop {
            let taken = self
                .pool
                .ready
                .lock()
                .expect("pool lock")
                .get_mut(key)
                .and_then(|e| e.vms.pop());
            let Some(Warm { live, weight, .. }) = taken else {
                self.pool.misses.fetch_add(1, Ordering::Relaxed);
                return None;
            };
            if live.vm.exit().borrow().is_none() {
                if let Some(weight) = weight {
                    weight.restore();
                }
                self.pool.hits.fetch_add(1, Ordering::Relaxed);
                return Some(live);
            }
            tracing::warn!(vm = %live.id, "a pooled VM died while idle");
            remove_files(&live.run_dir, &live.memory_file);
        }
    }

    /// Warm VMs of `key` now.
    fn pool_len(&self, key: &str) -> usize {
        self.pool
            .ready
            .lock()
            .expect("pool lock")
            .get(key)
            .map_or(0, |e| e.vms.len())
    }

    /// The size the pool of `key` should have now.
    fn pool_target(&self, key: &str) -> usize {
        let policy = &self.config.pool;
        policy.target(self.pool.demand(key, policy.window))
    }

    /// Fills the pool of `recipe`'s snapshot for this shape in the background, up to its
    /// target.
    pub(super) fn refill_pool(self: &Arc<Self>, recipe: &Recipe, vcpus: u32, memory_mib: u32) {
        if self.config.pool.min == 0 {
            return;
        }
        self.start_sweeper();
        let key = self.template_key(recipe, vcpus, memory_mib);
        if !self.pool.filling.lock().expect("pool lock").insert(key.clone()) {
            return;
        }
        let manager = Arc::downgrade(self);
        let recipe = recipe.clone();
        tokio::spawn(async move {
            loop {
                let Some(manager) = manager.upgrade() else { return };
                if manager.pool.closing.load(Ordering::SeqCst) {
                    break;
                }
                let have = manager.pool_len(&key);
                if have >= manager.pool_target(&key) {
                    // A create that counted itself after the target was read would find this
                    // filler still registered and leave the pool short: look again once it is
                    // unregistered.
                    manager.pool.filling.lock().expect("pool lock").remove(&key);
                    if manager.pool_len(&key) >= manager.pool_target(&key)
                        || !manager.pool.filling.lock().expect("pool lock").insert(key.clone())
                    {
                        return;
                    }
                    continue;
                }
                // Beyond the minimum, only while the host has room for one more VM.
                if have >= manager.config.pool.min && crate::capacity::check_room(memory_mib).is_err() {
                    tracing::debug!(template = %recipe.name, have, "the host has no room to grow the pool");
                    break;
                }
                match manager.warm_vm(&recipe, vcpus, memory_mib).await {
                    Ok((live, weight)) => {
                        let mut ready = manager.pool.ready.lock().expect("pool lock");
                        let entry = ready.entry(key.clone()).or_default();
                        entry.template = recipe.name.clone();
                        entry.vms.push(Warm {
                            live,
                            since: Instant::now(),
                            weight,
                        });
                    }
                    Err(err) => {
                        tracing::warn!(template = %recipe.name, error = %err, "warming a pooled VM failed");
                        break;
                    }
                }
            }
            if let Some(manager) = manager.upgrade() {
                manager.pool.filling.lock().expect("pool lock").remove(&key);
            }
        });
    }

    /// Starts the task that kills warm VMs idle beyond the pool's minimum (once).
    fn start_sweeper(self: &Arc<Self>) {
        if self.pool.sweeping.swap(true, Ordering::SeqCst) {
            return;
        }
        let manager = Arc::downgrade(self);
        let every = (self.config.pool.idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let stopping = self.stopping();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while super::stopping::next_tick(&mut tick, &stopping).await {
                let Some(manager) = manager.upgrade() else { return };
                if manager.pool.closing.load(Ordering::SeqCst) {
                    return;
                }
                manager.expire_idle().await;
            }
        });
    }

    /// Kills the warm VMs beyond the minimum that waited longer than the idle time (oldest
    /// first).
    async fn expire_idle(&self) {
        let policy = self.config.pool;
        let expired: Vec<Arc<LiveSandbox>> = {
            let mut ready = self.pool.ready.lock().expect("pool lock");
            let mut expired = Vec::new();
            for entry in ready.values_mut() {
                while entry.vms.len() > policy.min && entry.vms[0].since.elapsed() > policy.idle {
                    expired.push(entry.vms.remove(0).live);
                }
            }
            // Counted as they leave the pool, not as each is killed: a reader who sees the pool
            // smaller sees the counter grown with it (it saw 1 of 2 while the first was killed).
            self.pool.expired.fetch_add(expired.len() as u64, Ordering::Relaxed);
            expired
        };
        for live in expired {
            tracing::info!(vm = %live.id, "a warm VM idled too long; killed");
            let _ = live.vm.kill().await;
            remove_files(&live.run_dir, &live.memory_file);
        }
    }

    /// Restores one VM of `recipe`, initializes its agent and runs the warm-up commands in it,
    /// its CPU weight lowered from the start (returned to restore when it is taken).
    async fn warm_vm(
        &self,
        recipe: &Recipe,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<(Arc<LiveSandbox>, Option<super::pool_cpu::SavedWeight>), ApiError> {
        let template = self.template(recipe, vcpus, memory_mib).await?;
        let id = super::random_id(20);
        let run_dir = self.run_dir(&id);
        // In the isolated mode a warm VM reaches nothing until it is taken and gets its
        // sandbox's rules; a user-mode card cannot change, so it is unrestricted.
        let rules = match self.config.network {
            super::NetworkMode::Isolated => viv_net::PolicySpec::closed(),
            _ => viv_net::PolicySpec::open(),
        };
        let live = match self
            .start_sandbox_vm(&id, &run_dir, Origin::Template(&template), vcpus, memory_mib, &rules)
            .await
        {
            Ok(live) => live,
            Err(err) => {
                remove_files(&run_dir, &self.memory_file(&id));
                return Err(err);
            }
        };
        let weight = live.vm.pid().and_then(super::pool_cpu::lower);
        if let Err(err) = self.init_agent(&live, None, None).await {
            remove_files(&run_dir, &self.memory_file(&id));
            return Err(err);
        }
        // The command line clients use most (E2B's SDKs run `bash -l -c`) and the interpreter
        // code runs in most (Python): under TCG a program's first run in a VM pays for
        // translating its code, which stays cached for the next process that runs the same
        // pages. Best effort, since an image may have neither.
        let warm_up = |cmd: &str, args: &[&str]| StartRequest {
            process: ProcessConfig {
                cmd: cmd.into(),
                args: args.iter().map(|a| a.to_string()).collect(),
                ..ProcessConfig::default()
            },
            stdin: Some(false),
            ..StartRequest::default()
        };
        let runs = [
            warm_up("/bin/bash", &["-l", "-c", "true"]),
            warm_up("/bin/bash", &["-l", "-c", "true"]),
            warm_up("python3", &["-c", "pass"]),
            warm_up("python3", &["-c", "pass"]),
        ];
        for run in &runs {
            let _ = live.agent.run(run, None, |_, _| {}).await;
        }
        Ok((live, weight))
    }

    /// Stops filling the pool for good (the server is stopping): waits for VMs being warmed
    /// (a minute at most), which are then killed, and kills the pooled ones.
    pub(super) async fn close_pool(&self) {
        self.pool.closing.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.pool.filling.lock().expect("pool lock").is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.empty_pool(None).await;
    }

    /// Kills the pooled VMs of `template` (all when `None`).
    pub(super) async fn empty_pool(&self, template: Option<&str>) {
        let drained: Vec<Arc<LiveSandbox>> = {
            let mut ready = self.pool.ready.lock().expect("pool lock");
            let keys: Vec<String> = ready
                .iter()
                .filter(|(_, e)| template.is_none_or(|t| e.template == t))
                .map(|(k, _)| k.clone())
                .collect();
            keys.iter()
                .filter_map(|k| ready.remove(k))
                .flat_map(|e| e.vms.into_iter().map(|w| w.live))
                .collect()
        };
        for live in drained {
            let _ = live.vm.kill().await;
            remove_files(&live.run_dir, &live.memory_file);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_follows_demand_between_the_minimum_and_the_maximum() {
        let policy = PoolPolicy {
            min: 1,
            max: 4,
            window: Duration::from_secs(60),
            idle: Duration::from_secs(300),
        };
        assert_eq!(policy.target(0), 1);
        assert_eq!(policy.target(3), 3);
        assert_eq!(policy.target(9), 4);
        let off = PoolPolicy { min: 0, ..policy };
        assert_eq!(off.target(9), 0);
        let flat = PoolPolicy { max: 0, ..policy };
        assert_eq!(flat.target(9), 1);
    }

    #[test]
    fn demand_counts_only_the_window() {
        let mut times: VecDeque<Instant> = VecDeque::new();
        let now = Instant::now();
        times.push_back(now - Duration::from_secs(90));
        times.push_back(now - Duration::from_secs(30));
        times.push_back(now);
        prune(&mut times, now, Duration::from_secs(60));
        assert_eq!(times.len(), 2);
    }
}
