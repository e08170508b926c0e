//! The VM manager across server restarts: VMs keep running when the server stops (unless it
//! stops with `--on-shutdown kill`), a starting server takes over those still running, and VMs
//! marked autostart start in their order, with their delays.
//!
//! Invariants:
//! - a VM whose QEMU outlived the server is never killed as an orphan: its id is kept when the
//!   starting server reclaims its jail cgroups;
//! - a VM whose QEMU is gone when the server starts is recorded `crashed` (it did not stop
//!   because anyone asked), and its restart policy applies; one that runs is taken over with its
//!   machine rebuilt from its stored definition, which is the one it was started with;
//! - autostart starts only VMs that are not running (taken over ones are left alone), one at a
//!   time, lowest order first, ties by name.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use viv_api::vms::VmState;

use super::vm_runtime::LiveVm;
use super::vms::{definition_of, state_of};
use super::{Manager, ShutdownMode};
use crate::error::ApiError;

/// What happened to the VMs of the previous server.
#[derive(Debug, Default)]
pub struct VmRecovery {
    /// VMs whose QEMU ran on and was taken over.
    pub adopted: Vec<String>,
    /// VMs whose QEMU was gone or could not be taken over, with why.
    pub lost: Vec<(String, String)>,
}

impl Manager {
    /// Ids of VMs whose QEMU is still running, to keep when orphans are reclaimed.
    pub(super) fn vms_still_running(&self) -> Result<HashSet<String>, ApiError> {
        Ok(self
            .store
            .local_vms()?
            .into_iter()
            .filter(|row| {
                row.process
                    .is_some_and(|p| viv_vmm::process::start_time(p.pid) == Some(p.start_time))
            })
            .map(|row| row.id)
            .collect())
    }

    /// Takes over the VMs the previous server left running; records the others as crashed.
    pub(super) async fn recover_vms(self: &Arc<Self>, running: &HashSet<String>) -> Result<VmRecovery, ApiError> {
        let mut report = VmRecovery::default();
        self.remove_fork_leftovers();
        for row in self.store.local_vms()? {
            let state = state_of(&row)?;
            if !state.is_active() {
                continue;
            }
            let outcome = if running.contains(&row.id) {
                self.adopt_vm(&row).await
            } else {
                Err("its QEMU stopped while no server was running".to_owned())
            };
            match outcome {
                Ok(()) => report.adopted.push(row.id.clone()),
                Err(why) => {
                    let why = format!("lost across a server restart: {why}");
                    self.store.set_vm_exited(&row.id, VmState::Crashed.as_str(), &why)?;
                    self.publish_vm(&row.id, &row.name, state, VmState::Crashed, Some(why.clone()));
                    self.after_crash(&row.id, Duration::ZERO);
                    report.lost.push((row.id.clone(), why));
                }
            }
        }
        Ok(report)
    }

    /// Takes over the running QEMU of VM `row`: its machine is rebuilt from its definition
    /// (device ids are positional), its media and pause state are read back from QEMU.
    async fn adopt_vm(self: &Arc<Self>, row: &crate::store::VmRow) -> Result<(), String> {
        let identity = row.process.ok_or("no QEMU process is recorded")?;
        let def = definition_of(&row.definition).map_err(|e| e.to_string())?;
        let spec = match self.machine_spec(&row.id, &row.name, &def).await {
            Ok(spec) => spec,
            Err(err) => {
                if viv_vmm::process::start_time(identity.pid) == Some(identity.start_time) {
                    // SAFETY: kill with plain integers; the pid's start time was checked just
                    // above, so it is still the VM's QEMU.
                    unsafe { libc::kill(identity.pid as i32, libc::SIGKILL) };
                }
                return Err(format!(
                    "its definition no longer describes a machine ({err}); it was killed"
                ));
            }
        };
        let machine = self
            .qemu
            .adopt_machine(&spec, identity)
            .await
            .map_err(|e| e.to_string())?;
        let running = machine.status().await.map(|s| s.running).unwrap_or(true);
        let agent = definition_of(&row.definition).is_ok_and(|d| d.sandbox_kernel);
        let live = LiveVm::new(&row.id, machine, self.vm_console_log_path(&row.id), agent, true);
        let state = state_of(row).map_err(|e| e.to_string())?;
        let now = if running { VmState::Running } else { VmState::Paused };
        self.vm_runtime.insert(live.clone());
        if state != now {
            // A start or stop the previous server did not finish.
            let _ = self.vm_transition(&row.id, &row.name, state, now, Some("taken over".into()));
        }
        self.supervise_vm(live);
        tracing::info!(vm = %row.id, name = %row.name, pid = identity.pid, "VM taken over: it ran on while no server was running");
        Ok(())
    }

    /// Starts the VMs marked autostart that are not running, lowest order first (ties by name),
    /// waiting each one's delay before the next. Runs in the background.
    pub fn autostart_vms(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let manager = self.clone();
        tokio::spawn(async move {
            let rows = match manager.store.local_vms() {
                Ok(rows) => rows,
                Err(err) => {
                    tracing::warn!(error = %err, "autostart: listing VMs failed");
                    return;
                }
            };
            let mut starts: Vec<(u32, String, String, u32)> = rows
                .into_iter()
                .filter_map(|row| {
                    let def = definition_of(&row.definition).ok()?;
                    let state = state_of(&row).ok()?;
                    (def.autostart.enabled && !state.is_active()).then_some((
                        def.autostart.order,
                        row.name,
                        row.id,
                        def.autostart.delay_secs,
                    ))
                })
                .collect();
            starts.sort();
            for (order, name, id, delay) in starts {
                tracing::info!(vm = %id, %name, order, "autostart");
                if let Err(err) = manager.start_vm(&id).await {
                    tracing::warn!(vm = %id, %name, error = %err, "autostart failed");
                    continue;
                }
                if delay > 0 {
                    tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                }
            }
        })
    }

    /// Server shutdown: VMs run on for the next server, except with `kill`. Whether some were
    /// left running.
    pub(super) async fn shutdown_vms(&self, mode: ShutdownMode) -> bool {
        // A VM migrating in is nobody's yet: no next server could finish receiving it.
        self.abort_all_incoming().await;
        let lives = self.vm_runtime.drain();
        if lives.is_empty() {
            return false;
        }
        if mode != ShutdownMode::Kill {
            for live in &lives {
                live.detach();
            }
            tracing::info!(
                vms = lives.len(),
                "leaving VMs running; the next server on this data directory takes them over"
            );
            return true;
        }
        for live in &lives {
            live.ask_to_stop("killed: the server stopped with --on-shutdown kill");
            if let Err(err) = live.machine.kill().await {
                tracing::warn!(vm = %live.id, error = %err, "killing a VM at shutdown failed");
            }
        }
        for live in &lives {
            live.exit_recorded().await;
        }
        false
    }
}
