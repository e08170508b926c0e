//! Launching a sandbox's VM: what it starts from (a boot, a template snapshot, a node of the
//! snapshot tree, whole or as a memory diff chain) becomes a [`VmSpec`], the VM is started and
//! its agent reached and initialized.
//!
//! Invariants: a VM that fails to start or whose agent does not answer is killed before the
//! error returns, and the error carries the console's last lines; a node's state is opened
//! before its chain files are read (see `memory_chain.rs`).

use super::*;
use viv_vmm::Composed;

impl Manager {
    /// Starts a VM in `run_dir` from `origin` and waits until its agent answers (not yet
    /// initialized). On failure the VM is killed and the error carries the console's last lines.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn start_sandbox_vm(
        &self,
        id: &str,
        run_dir: &Path,
        origin: Origin<'_>,
        vcpus: u32,
        memory_mib: u32,
        rules: &viv_net::PolicySpec,
    ) -> Result<Arc<LiveSandbox>, ApiError> {
        if crate::capacity::check_room(memory_mib).is_err() && self.evict_parked(true).await > 0 {
            tracing::info!(sandbox = %id, "parked VMs evicted to make room");
        }
        crate::capacity::check_room(memory_mib)?;
        std::fs::create_dir_all(run_dir)
            .map_err(|e| ApiError::Internal(format!("creating {}: {e}", run_dir.display())))?;
        let overlay = run_dir.join("root.qcow2");
        // The key the restored guest's agent has until it is initialized with this server's.
        let restore_key = match origin {
            Origin::Node(dir) => self.node_channel_key(dir),
            _ => self.channel_key.clone(),
        };
        let (layer, memory, restore_from) = match origin {
            Origin::Boot { layer, memory_file } => (layer.to_path_buf(), GuestMemory::SharedFile(memory_file), None),
            Origin::Template(template) => {
                self.record_memory_base(run_dir, &template.memory_file);
                (
                    template.disk.clone(),
                    GuestMemory::PrivateFile(template.memory_file.clone()),
                    Some(Restore {
                        state: template.state.clone(),
                        opened: None,
                        memory: SnapshotMemory::External,
                        composed: None,
                    }),
                )
            }
            Origin::Node(dir) => {
                let state = dir.join("state");
                if !state.is_file() {
                    return Err(ApiError::Conflict(format!(
                        "snapshot {} holds a disk layer but no saved VM state (its save failed)",
                        dir.display()
                    )));
                }
                // A diff chain restores onto its base, mapped privately as a template's memory;
                // so does a whole state whose VM mapped a file that is still there, loading only
                // the pages that differ from it.
                let (memory, opened, composed) = match self.node_memory(dir).await? {
                    memory_chain::NodeMemory::Chain { base, chain } => {
                        self.record_memory_base(run_dir, &base);
                        (GuestMemory::PrivateFile(base), None, Some(Composed::Chain(chain)))
                    }
                    memory_chain::NodeMemory::Whole { file, source } => {
                        // Saves of this VM still diff against the base its parent's VM mapped.
                        let over = match &source {
                            Some(source) => {
                                self.record_memory_base(run_dir, source);
                                memory_chain::over_base(&self.base_indexes, &state, &file, source).await
                            }
                            None => None,
                        };
                        match (source, over) {
                            (Some(source), Some(over)) => {
                                (GuestMemory::PrivateFile(source), None, Some(Composed::OverBase(over)))
                            }
                            _ => (GuestMemory::Anonymous, Some(file), None),
                        }
                    }
                };
                (
                    dir.join("disk.qcow2"),
                    memory,
                    Some(Restore {
                        state,
                        opened,
                        memory: SnapshotMemory::Included,
                        composed,
                    }),
                )
            }
        };
        // The overlay (a `qemu-img` run) and the network slot (a namespace, links and rules) do
        // not depend on each other; a slot made for nothing is released when dropped.
        let (overlaid, network) = tokio::join!(create_overlay(&layer, &overlay), self.network(rules));
        overlaid?;
        let (network, slot) = network?;
        let spec = VmSpec {
            vm_id: id.to_owned(),
            name: format!("viv-{}", &id[..8.min(id.len())]),
            run_dir: run_dir.to_path_buf(),
            kernel: self.boot.kernel.clone(),
            initramfs: self.boot.initramfs.clone(),
            root_disk: overlay.clone(),
            memory,
            restore_from,
            vcpus,
            memory_mib,
            accel: self.accel,
            extra_cmdline: String::new(),
            network,
        };
        let vm = self.vmm.launch(&spec).await.map_err(|e| match e {
            viv_vmm::LaunchError::MissingBinary { .. }
            | viv_vmm::LaunchError::AccelUnavailable(_)
            | viv_vmm::LaunchError::Exhausted(_) => ApiError::Unavailable(e.to_string()),
            other => ApiError::Sandbox(format!("sandbox {id} failed to start: {other}")),
        })?;
        let live = Arc::new(LiveSandbox {
            id: id.to_owned(),
            vm,
            agent: AgentClient::new(spec.agent_socket()),
            run_dir: run_dir.to_path_buf(),
            memory_file: self.memory_file(id),
            root_disk: Mutex::new(overlay),
            op: tokio::sync::Mutex::new(()),
            slot: Mutex::new(slot.map(Arc::new)),
        });
        live.agent.set_data_path(live.slot().map(|slot| slot.netns_path()));
        let mut exit = live.vm.exit();
        let mut port = live.vm.agent_port_open();
        let limit = self.config.boot_timeout;
        let restored = spec.restore_from.is_some();
        if restored {
            live.agent.set_channel_key(restore_key);
        }
        let boot = async {
            // A restored guest's port is already open (QEMU reports no event for it, and
            // rate-limits port events to one a second anyway), so it is probed directly.
            if restored {
                return live.agent.wait_ready(limit).await.map_err(|e| e.to_string());
            }
            tokio::time::timeout(limit, port.wait_for(|open| *open))
                .await
                .map_err(|_| format!("the guest did not open its agent channel within {limit:?}"))?
                .map_err(|_| "the VM stopped".to_owned())?;
            live.agent.wait_ready(limit).await.map_err(|e| e.to_string())
        };
        let ready = tokio::select! {
            ready = boot => ready,
            stopped = exit.wait_for(Option::is_some) => {
                let reason = stopped.ok().and_then(|e| e.as_ref().map(|e| e.reason.clone())).unwrap_or_default();
                Err(format!("the VM stopped while booting: {reason}"))
            }
        };
        match ready {
            Ok(()) => {
                tracing::debug!(sandbox = %id, restored, "agent answered");
                Ok(live)
            }
            Err(reason) => Err(self.abandon(&live, &spec, &reason).await),
        }
    }

    /// Kills a VM that failed to come up and describes why, with the console's last lines.
    pub(super) async fn abandon(&self, live: &LiveSandbox, spec: &VmSpec, reason: &str) -> ApiError {
        let _ = live.vm.kill().await;
        let console = std::fs::read_to_string(spec.console_log()).unwrap_or_default();
        let tail: Vec<&str> = console.lines().filter(|l| !l.trim().is_empty()).collect();
        let tail = tail[tail.len().saturating_sub(8)..].join(" | ");
        ApiError::Sandbox(format!(
            "sandbox {} failed to start: {reason}; console: {tail}",
            live.id
        ))
    }

    /// Gives a started agent its clock, environment, token and host name.
    pub(super) async fn init_agent(
        &self,
        live: &LiveSandbox,
        token: Option<String>,
        env_vars: Option<BTreeMap<String, String>>,
    ) -> Result<(), ApiError> {
        // Without `envVars` (a resume or a fork), the agent keeps the variables it has. The
        // clock is read again for each attempt: a retry comes seconds later, and an old reading
        // would set the guest's clock back by that much.
        let body = || {
            serde_json::json!({
                "timestampMs": now_ms(),
                "envVars": env_vars,
                "accessToken": token.clone().unwrap_or_default(),
                "hostname": "sandbox",
                "channelKey": self.channel_key,
                "caCertificates": self.config.guest_ca_certificates,
            })
        };
        // A connection that breaks (a channel reset that lost a race with the guest) is retried
        // on a fresh one.
        let mut result = live.agent.call::<_, serde_json::Value>("/init", &body()).await;
        for _ in 0..5 {
            let Err(crate::agent_client::AgentError::Channel(why)) = &result else {
                break;
            };
            tracing::debug!(sandbox = %live.id, %why, "initializing the agent: trying a new connection");
            live.agent.close().await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            result = match live.agent.wait_ready(self.config.boot_timeout).await {
                Ok(()) => live.agent.call::<_, serde_json::Value>("/init", &body()).await,
                Err(err) => Err(err),
            };
        }
        if let Err(err) = result {
            let _ = live.vm.kill().await;
            return Err(ApiError::Sandbox(format!(
                "sandbox {} failed to start: initializing its agent: {err}",
                live.id
            )));
        }
        live.agent.set_token(token);
        live.agent.set_channel_key(self.channel_key.clone());
        tracing::debug!(sandbox = %live.id, "agent initialized");
        Ok(())
    }
}
