//! Warm sandboxes: VMs restored from a template snapshot ahead of time, their agent answering
//! and a first command already run (under TCG a freshly restored VM pays for an empty
//! translation cache on its first command), so that a create only has to initialize the agent.
//!
//! Invariants:
//! - a pooled VM has a run directory like a sandbox's (named by the id the sandbox will get) but
//!   no row; it becomes a sandbox only through [`Manager::take_pooled`], which removes it from
//!   the pool first, so no VM is handed out twice;
//! - the pool of one template snapshot (template and VM shape) is refilled in the background
//!   after every create from it, up to `pool_size`; pools of a template that is rebuilt or
//!   deleted are emptied, since their disks sit on the old snapshot;
//! - pooled VMs are killed at shutdown; their run directories have no row, so a server that
//!   crashed removes them at its next start.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use viv_proto::process::{ProcessConfig, StartRequest};

use super::templates::Recipe;
use super::{remove_files, LiveSandbox, Manager, Origin};
use crate::error::ApiError;

/// Warm VMs by template snapshot key.
#[derive(Default)]
pub struct Pool {
    ready: Mutex<HashMap<String, PoolEntry>>,
    filling: Mutex<HashSet<String>>,
    /// Set when the server stops: no VM is warmed any more (one being warmed still joins the
    /// pool, which `close_pool` empties once no filling is left).
    closing: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct PoolEntry {
    /// The template the VMs are of.
    template: String,
    vms: Vec<Arc<LiveSandbox>>,
}

impl Pool {
    /// Number of warm VMs.
    pub fn ready_count(&self) -> usize {
        self.ready
            .lock()
            .expect("pool lock")
            .values()
            .map(|e| e.vms.len())
            .sum()
    }
}

impl Manager {
    /// A warm VM of this template snapshot, if one is ready.
    pub(super) fn take_pooled(&self, key: &str) -> Option<Arc<LiveSandbox>> {
        loop {
            let live = self.pool.ready.lock().expect("pool lock").get_mut(key)?.vms.pop()?;
            if live.vm.exit().borrow().is_none() {
                return Some(live);
            }
            tracing::warn!(vm = %live.id, "a pooled VM died while idle");
            remove_files(&live.run_dir, &live.memory_file);
        }
    }

    /// Fills the pool of `recipe`'s snapshot for this shape in the background.
    pub(super) fn refill_pool(self: &Arc<Self>, recipe: &Recipe, vcpus: u32, memory_mib: u32) {
        if self.config.pool_size == 0 {
            return;
        }
        let key = self.template_key(recipe, vcpus, memory_mib);
        if !self.pool.filling.lock().expect("pool lock").insert(key.clone()) {
            return;
        }
        let manager = Arc::downgrade(self);
        let recipe = recipe.clone();
        tokio::spawn(async move {
            loop {
                let Some(manager) = manager.upgrade() else { return };
                if manager.pool.closing.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let have = manager
                    .pool
                    .ready
                    .lock()
                    .expect("pool lock")
                    .get(&key)
                    .map_or(0, |e| e.vms.len());
                if have >= manager.config.pool_size {
                    break;
                }
                match manager.warm_vm(&recipe, vcpus, memory_mib).await {
                    Ok(live) => {
                        let mut ready = manager.pool.ready.lock().expect("pool lock");
                        let entry = ready.entry(key.clone()).or_default();
                        entry.template = recipe.name.clone();
                        entry.vms.push(live);
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

    /// Restores one VM of `recipe`, initializes its agent and runs a first command in it.
    async fn warm_vm(&self, recipe: &Recipe, vcpus: u32, memory_mib: u32) -> Result<Arc<LiveSandbox>, ApiError> {
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
        if let Err(err) = self.init_agent(&live, None, None).await {
            remove_files(&run_dir, &self.memory_file(&id));
            return Err(err);
        }
        // The command line clients use most (E2B's SDKs run `bash -l -c`); best effort, since an
        // image may have no bash.
        let warm_up = StartRequest {
            process: ProcessConfig {
                cmd: "/bin/bash".into(),
                args: vec!["-l".into(), "-c".into(), "true".into()],
                ..ProcessConfig::default()
            },
            stdin: Some(false),
            ..StartRequest::default()
        };
        for _ in 0..2 {
            let _ = live.agent.run(&warm_up, None, |_, _| {}).await;
        }
        Ok(live)
    }

    /// Stops filling the pool for good (the server is stopping): waits for VMs being warmed
    /// (a minute at most), which are then killed, and kills the pooled ones.
    pub(super) async fn close_pool(&self) {
        self.pool.closing.store(true, std::sync::atomic::Ordering::SeqCst);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !self.pool.filling.lock().expect("pool lock").is_empty() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
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
                .flat_map(|e| e.vms)
                .collect()
        };
        for live in drained {
            let _ = live.vm.kill().await;
            remove_files(&live.run_dir, &live.memory_file);
        }
    }
}
