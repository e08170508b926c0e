//! Lifecycle options (E2B's `autoPause`, `autoPauseMemory` and `autoResume`) and saves that keep
//! only the disk.
//!
//! - A sandbox created with `autoPause` is paused at its timeout instead of killed, keeping its
//!   memory or, with `autoPauseMemory: false`, only its disk.
//! - Traffic for a paused sandbox created with `autoResume` (any request the proxy forwards: an
//!   envd call, or a request to one of its ports) resumes it, and the request then goes through
//!   as if the sandbox had been running: it only waits.
//! - Resumes of one sandbox are serialized by a per-sandbox gate ([`ResumeGates`]): concurrent
//!   requests and connects cause one resume; whoever waited finds the sandbox running.
//! - A filesystem-only save flushes the guest's writes (the agent's `sync`), then freezes its
//!   disk overlay as the node's layer the way a fork does (QEMU drains and flushes its caches
//!   into it) and saves no VM state; the node holds a [`DISK_ONLY`] marker. Starting from such a
//!   node, or resuming with `memory: false`, boots the saved disk afresh: a new kernel, no
//!   processes, the files kept; the agent gets the sandbox's token and creation environment
//!   again.
//! - A sandbox paused without its memory is never resumed by traffic (as in E2B): a fresh boot
//!   under a request that expects the processes it left would be a surprise; `connect` resumes it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};

use viv_api::{NewSandbox, SandboxLifecycle, SandboxState};

use super::templates::Recipe;
use super::{LiveSandbox, Manager, Source};
use crate::error::ApiError;
use crate::store::{LifecycleRow, SandboxRow, SnapshotRow};

/// The file in a snapshot node's directory marking a save without VM state (only its disk).
pub(super) const DISK_ONLY: &str = "disk-only";

/// One async lock per sandbox id, held while the sandbox resumes.
#[derive(Default)]
pub(super) struct ResumeGates(Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>);

impl ResumeGates {
    /// The gate of sandbox `id` (the same one for every caller while anyone holds it).
    pub(super) fn gate(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut gates = self.0.lock().expect("gates lock");
        gates.retain(|_, gate| gate.strong_count() > 0);
        if let Some(gate) = gates.get(id).and_then(Weak::upgrade) {
            return gate;
        }
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        gates.insert(id.to_owned(), Arc::downgrade(&gate));
        gate
    }
}

/// Most copies of a pause a sandbox may ask for.
const MAX_PAUSE_REPLICAS: u32 = 8;

/// The lifecycle options of a create request, checked as E2B checks them. `env_vars` is the
/// environment the sandbox starts with (kept for boots of its saved disk).
pub(super) fn lifecycle_of(
    req: &NewSandbox,
    timeout_secs: u64,
    env_vars: &BTreeMap<String, String>,
) -> Result<LifecycleRow, ApiError> {
    let auto_pause = req.auto_pause.unwrap_or(false);
    let auto_resume = req.auto_resume.as_ref().is_some_and(|a| a.enabled);
    let pause_memory = req.auto_pause_memory.unwrap_or(true);
    if auto_resume && !auto_pause {
        return Err(ApiError::BadRequest(
            "autoResume needs autoPause: a sandbox killed at its timeout has nothing to resume".into(),
        ));
    }
    if auto_resume && !pause_memory {
        return Err(ApiError::BadRequest(
            "autoResume cannot be combined with autoPauseMemory: false: a sandbox paused without its memory boots afresh when resumed, so it is resumed only explicitly (connect)".into(),
        ));
    }
    if let Some(n) = req.pause_replicas.filter(|n| *n > MAX_PAUSE_REPLICAS) {
        return Err(ApiError::BadRequest(format!(
            "pauseReplicas {n} is more than {MAX_PAUSE_REPLICAS} copies"
        )));
    }
    Ok(LifecycleRow {
        auto_resume,
        pause_memory,
        timeout_secs,
        env_vars: env_vars.clone(),
        pause_replicas: req.pause_replicas,
    })
}

/// How long a full pause waits for the guest to flush its writes before it saves it anyway.
const FLUSH_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Asks the guest to write its dirty pages to its disk, so that a boot of the saved disk (a
/// resume with `memory: false`) finds what was written before a full pause; gives up quietly
/// after [`FLUSH_LIMIT`] (the memory has everything anyway).
pub(super) async fn flush_guest(live: &LiveSandbox) {
    let flushed = tokio::time::timeout(
        FLUSH_LIMIT,
        live.agent
            .call::<_, serde_json::Value>("/build/sync", &serde_json::json!({})),
    )
    .await;
    if !matches!(flushed, Ok(Ok(_))) {
        tracing::warn!(sandbox = %live.id, "the guest did not flush its writes before the pause");
    }
}

impl Manager {
    /// Records the lifecycle options of a sandbox about to start.
    pub(super) fn record_lifecycle(&self, id: &str, lifecycle: &LifecycleRow) -> Result<(), ApiError> {
        Ok(self.store.put_lifecycle(id, lifecycle)?)
    }

    /// Whether snapshot node `node_id` holds the VM's memory (otherwise only its disk).
    pub(super) fn node_has_memory(&self, node_id: &str) -> bool {
        !self.node_dir(node_id).join(DISK_ONLY).exists()
    }

    /// Whether a start from `node` boots its disk afresh: asked for (`cold`), or nothing else
    /// was saved.
    pub(super) fn boots_from_disk(&self, node: &SnapshotRow, cold: bool) -> bool {
        cold || !self.node_has_memory(&node.id)
    }

    /// How a start from `source` boots when it boots a node's disk (`disk_boot`): like a cold
    /// boot of the template the node's chain starts from, if it still exists (its environment
    /// under `env_vars`, then its start command). Returns that template and the environment.
    pub(super) fn disk_boot_plan(
        &self,
        source: &Source,
        disk_boot: bool,
        env_vars: Option<BTreeMap<String, String>>,
    ) -> (Option<Recipe>, Option<BTreeMap<String, String>>) {
        let Source::Node(node) = source else {
            return (None, env_vars);
        };
        if !disk_boot {
            return (None, env_vars);
        }
        let Ok(recipe) = self.recipe(&node.template_id) else {
            return (None, env_vars);
        };
        let mut env = recipe.config.env.clone();
        env.extend(env_vars.unwrap_or_default());
        (Some(recipe), Some(env))
    }

    /// The environment a boot of sandbox `id`'s saved disk gives its agent: the one it was
    /// created with.
    pub(super) fn boot_env(&self, id: &str) -> BTreeMap<String, String> {
        self.store
            .lifecycle(id)
            .ok()
            .flatten()
            .map(|l| l.env_vars)
            .unwrap_or_default()
    }

    /// The lifecycle policy and, for a paused sandbox, the pause mode, as sandbox info shows them.
    pub(super) fn lifecycle_view(&self, row: &SandboxRow) -> (SandboxLifecycle, Option<String>) {
        let auto_resume = self
            .store
            .lifecycle(&row.id)
            .ok()
            .flatten()
            .is_some_and(|l| l.auto_resume);
        let lifecycle = SandboxLifecycle {
            auto_resume,
            on_timeout: if row.auto_pause { "pause" } else { "kill" }.to_owned(),
        };
        let pause_mode = match (&row.state, &row.snapshot_id) {
            (SandboxState::Paused, Some(node)) => Some(
                if self.node_has_memory(node) {
                    "full"
                } else {
                    "filesystem"
                }
                .to_owned(),
            ),
            _ => None,
        };
        (lifecycle, pause_mode)
    }

    /// Pauses a sandbox whose timeout passed, keeping what it asked to keep. A filesystem-only
    /// pause that fails (its agent did not flush the guest's writes) keeps the memory instead:
    /// the alternative at a timeout is losing the sandbox.
    pub(super) async fn pause_at_timeout(&self, id: &str) -> Result<(), ApiError> {
        let memory = self.store.lifecycle(id)?.is_none_or(|l| l.pause_memory);
        match self.pause_keeping(id, memory, true).await {
            Err(err) if !memory && self.live(id).is_ok() => {
                tracing::warn!(sandbox = %id, error = %err, "filesystem-only pause failed; pausing with memory");
                self.pause_keeping(id, true, true).await.map(drop)
            }
            result => result.map(drop),
        }
    }

    /// The live sandbox `id` for traffic the proxy forwards: a pause in progress ends first, and
    /// a paused sandbox with auto-resume is resumed (once, however many requests wait for it).
    /// Without auto-resume the answer is what [`Manager::live`] says.
    pub async fn wake(self: &Arc<Self>, id: &str) -> Result<Arc<LiveSandbox>, ApiError> {
        if let Ok(live) = self.live(id) {
            // An operation holds the sandbox (a pause, perhaps): wait for it, then look again.
            if live.op.try_lock().is_ok() {
                return Ok(live);
            }
            live.settled().await;
        }
        let refused = match self.live(id) {
            Ok(live) => return Ok(live),
            Err(err) => err,
        };
        let auto_resume = self.store.lifecycle(id)?.is_some_and(|l| l.auto_resume);
        if !auto_resume {
            return Err(refused);
        }
        let gate = self.resume_gates.gate(id);
        let _resuming = gate.lock().await;
        // Another request may have resumed it while this one waited.
        if let Ok(live) = self.live(id) {
            return Ok(live);
        }
        let Some(row) = self.store.sandbox(id)? else {
            return Err(refused);
        };
        if row.state != SandboxState::Paused {
            return Err(refused);
        }
        if row
            .snapshot_id
            .as_deref()
            .is_some_and(|node| !self.node_has_memory(node))
        {
            return Err(ApiError::Conflict(format!(
                "sandbox '{id}' was paused without its memory, so traffic does not resume it; resume it explicitly (connect)"
            )));
        }
        let timeout = self
            .store
            .lifecycle(id)?
            .map_or(viv_api::DEFAULT_TIMEOUT_SECS, |l| l.timeout_secs);
        tracing::info!(sandbox = %id, "traffic for a paused sandbox with auto-resume; resuming it");
        self.resume_locked(row, timeout, true).await?;
        self.metrics.sandboxes_auto_resumed.inc();
        self.live(id)
    }

    /// Saves only the disk of a running sandbox into the node being built at `building`: the
    /// guest's writes are flushed, the vCPUs stop and the overlay is frozen as the node's layer.
    /// A snapshot (`keep_running`) lets the VM go on on a new overlay; a pause stops it.
    pub(super) async fn save_disk(
        &self,
        live: &LiveSandbox,
        dir: &Path,
        building: &Path,
        keep_running: bool,
    ) -> Result<(), ApiError> {
        live.agent
            .call::<_, serde_json::Value>("/build/sync", &serde_json::json!({}))
            .await
            .map_err(|e| {
                ApiError::Unavailable(format!(
                    "sandbox {}: its agent did not flush the guest's writes, which a filesystem-only save needs: {e}",
                    live.id
                ))
            })?;
        std::fs::write(building.join(DISK_ONLY), b"")
            .map_err(|e| ApiError::Internal(format!("marking {}: {e}", building.display())))?;
        let vm_error =
            |what: &str, err: viv_vmm::VmError| ApiError::Sandbox(format!("{what} sandbox {}: {err}", live.id));
        live.vm.pause().await.map_err(|e| vm_error("pausing", e))?;
        let swapped = self
            .swap_disk(live, &building.join("disk.qcow2"), &dir.join("disk.qcow2"))
            .await;
        if keep_running || swapped.is_err() {
            let resumed = live.vm.resume().await;
            swapped?;
            return resumed.map_err(|e| vm_error("resuming", e));
        }
        live.agent.close().await;
        let _ = live.vm.kill().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_gate_per_sandbox_while_held() {
        let gates = ResumeGates::default();
        let a = gates.gate("a");
        assert!(Arc::ptr_eq(&a, &gates.gate("a")));
        assert!(!Arc::ptr_eq(&a, &gates.gate("b")));
        drop(a);
        // Nobody holds "a" any more: its entry goes when the next gate is handed out.
        let _c = gates.gate("c");
        assert_eq!(gates.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn auto_resume_needs_a_pause_that_keeps_memory() {
        let env = BTreeMap::new();
        let req = |pause: Option<bool>, memory: Option<bool>, resume: Option<bool>| NewSandbox {
            auto_pause: pause,
            auto_pause_memory: memory,
            auto_resume: resume.map(|enabled| viv_api::AutoResume { enabled }),
            ..NewSandbox::default()
        };
        let ok = lifecycle_of(&req(Some(true), None, Some(true)), 30, &env).unwrap();
        assert!(ok.auto_resume && ok.pause_memory);
        assert_eq!(ok.timeout_secs, 30);
        let too_many = NewSandbox {
            pause_replicas: Some(9),
            ..NewSandbox::default()
        };
        let err = lifecycle_of(&too_many, 30, &env).unwrap_err();
        assert!(err.to_string().contains("pauseReplicas 9"), "{err}");
        let fs = lifecycle_of(&req(Some(true), Some(false), Some(false)), 30, &env).unwrap();
        assert!(!fs.auto_resume && !fs.pause_memory);
        assert!(lifecycle_of(&req(None, None, None), 30, &env).is_ok());
        for bad in [req(None, None, Some(true)), req(Some(true), Some(false), Some(true))] {
            assert!(matches!(lifecycle_of(&bad, 30, &env), Err(ApiError::BadRequest(_))));
        }
    }
}
