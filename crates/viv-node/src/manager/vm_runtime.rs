//! Running VMs of the VM manager: start, stop, kill, pause, resume, restart; the state machine
//! and its events; crash handling and the restart policy.
//!
//! States: `defined` → `starting` → `running` ⇄ `paused`; `running`/`paused` → `stopping` →
//! `stopped`; any active state → `stopped` (a kill, a guest power-off) or `crashed` (QEMU died
//! or the guest crashed without being asked to stop); `stopped`/`crashed`/`defined` →
//! `starting` again. A start that fails leaves the VM in the state it had, with the reason in
//! `lastExit`.
//!
//! Invariants:
//! - start, stop, kill, pause, resume, restart and delete of one VM are serialized by its gate;
//!   the supervisor of a VM's QEMU never takes the gate (a stop holding it waits for the
//!   supervisor), so nothing waits in a circle;
//! - every state change is written to the store first and then published on the event bus, in
//!   that order, so a client that reads the VM after an event sees at least that state;
//! - a VM is in the live map exactly while its QEMU process may run; the supervisor removes it
//!   and records how QEMU ended before the stop or kill that caused the exit returns;
//! - an exit we asked for (stop, kill, restart, server shutdown with `kill`) or a guest
//!   power-off is `stopped`; any other exit is `crashed`, and only a crash triggers the restart
//!   policy;
//! - a VM left running at server shutdown is detached, never recorded as stopped or crashed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use viv_api::events::EventKind;
use viv_api::vms::{DiskDisposal, RestartPolicy, VmDefinition, VmInfo, VmState};
use viv_vmm::machine::Machine;

use super::events::Change;
use super::vm_console::ConsoleHub;
use super::vms::{definition_of, state_of, to_json, writable_disks};
use super::Manager;
use crate::error::ApiError;

/// First delay before a crashed VM with `on-failure` restarts; it doubles up to
/// [`MAX_RESTART_DELAY`].
const FIRST_RESTART_DELAY: Duration = Duration::from_secs(1);
/// Longest delay between restarts of a VM that keeps crashing.
const MAX_RESTART_DELAY: Duration = Duration::from_secs(300);
/// A VM that ran this long before crashing restarts after [`FIRST_RESTART_DELAY`] again.
const STABLE_RUN: Duration = Duration::from_secs(60);

/// A VM whose QEMU runs.
pub struct LiveVm {
    /// Its id.
    pub id: String,
    /// The machine.
    pub machine: Arc<Machine>,
    /// Its serial console.
    pub console: Arc<ConsoleHub>,
    /// The sandbox agent's channel, for VMs that boot the sandbox kernel.
    pub agent: Option<Arc<super::vm_bridge::VmAgent>>,
    /// When its QEMU started (this server's clock).
    started: Instant,
    /// Why we asked QEMU to go, once we have: its exit is then a stop, not a crash.
    stop_reason: Mutex<Option<String>>,
    /// Left running for the next server: its exit is none of this server's business.
    detached: AtomicBool,
    /// Set once the supervisor has recorded the exit.
    recorded: tokio::sync::watch::Sender<bool>,
}

impl LiveVm {
    /// A VM whose QEMU runs as `machine`, its console read into `console_log`; with `agent`,
    /// it runs the sandbox agent (`adopted`: one a previous server may have initialized).
    pub(super) fn new(id: &str, machine: Machine, console_log: PathBuf, agent: bool, adopted: bool) -> Arc<Self> {
        let console = ConsoleHub::start(machine.serial_socket(), console_log);
        let agent = agent.then(|| Arc::new(super::vm_bridge::VmAgent::new(machine.agent_socket(), adopted)));
        Arc::new(Self {
            id: id.to_owned(),
            machine: Arc::new(machine),
            console,
            agent,
            started: Instant::now(),
            stop_reason: Mutex::new(None),
            detached: AtomicBool::new(false),
            recorded: tokio::sync::watch::channel(false).0,
        })
    }

    pub(super) fn ask_to_stop(&self, why: impl Into<String>) {
        self.stop_reason.lock().expect("stop reason lock").replace(why.into());
    }

    /// Waits until the supervisor has recorded the VM's exit.
    pub(super) async fn exit_recorded(&self) {
        let mut rx = self.recorded.subscribe();
        let _ = rx.wait_for(|done| *done).await;
    }

    /// Lets the VM run on without this server.
    pub(super) fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
        self.machine.detach();
    }
}

/// The running VMs, the gates that serialize operations per VM, and restart back-offs.
#[derive(Default)]
pub struct VmRuntime {
    live: Mutex<HashMap<String, Arc<LiveVm>>>,
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    restart_delays: Mutex<HashMap<String, Duration>>,
}

impl VmRuntime {
    pub(super) fn gate(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.gates
            .lock()
            .expect("VM gates lock")
            .entry(id.to_owned())
            .or_default()
            .clone()
    }

    pub(super) fn get(&self, id: &str) -> Option<Arc<LiveVm>> {
        self.live.lock().expect("VM runtime lock").get(id).cloned()
    }

    pub(super) fn insert(&self, live: Arc<LiveVm>) {
        self.live.lock().expect("VM runtime lock").insert(live.id.clone(), live);
    }

    pub(super) fn drain(&self) -> Vec<Arc<LiveVm>> {
        self.live
            .lock()
            .expect("VM runtime lock")
            .drain()
            .map(|(_, l)| l)
            .collect()
    }

    /// Removes `live` if it is still the VM's entry.
    fn remove(&self, live: &Arc<LiveVm>) {
        let mut map = self.live.lock().expect("VM runtime lock");
        if map.get(&live.id).is_some_and(|l| Arc::ptr_eq(l, live)) {
            map.remove(&live.id);
        }
    }
}

/// Held while an operation on one VM runs.
pub(super) type VmGuard = tokio::sync::OwnedMutexGuard<()>;

impl Manager {
    /// Waits for VM `id_or_name`'s gate and returns its row as read under it.
    pub(super) async fn lock_vm(&self, id_or_name: &str) -> Result<(crate::store::VmRow, VmGuard), ApiError> {
        let row = self.vm_row(id_or_name)?;
        let gate = self.vm_runtime.gate(&row.id);
        let held = loop {
            // A VM being received holds its gate until the migration finishes or is deleted
            // (up to half an hour): say so rather than wait (looked at again every second, as
            // the receiver takes the gate before it registers the migration).
            if let Some(incoming) = self.incoming.receiving(&row.id) {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' is being received by incoming migration '{incoming}': wait for it to finish, or delete it (DELETE /migrations/incoming/{incoming})",
                    row.name
                )));
            }
            if let Ok(held) = tokio::time::timeout(Duration::from_secs(1), gate.clone().lock_owned()).await {
                break held;
            }
        };
        let id = row.id;
        Ok((self.vm_row(&id)?, held))
    }

    /// The directory storage pool (disks, ISOs, cloud-init seeds).
    pub fn storage(&self) -> &Arc<viv_storage::DirPool> {
        &self.storage
    }

    /// A running VM by id or name; 404 when there is no such VM, 409 when it is not running.
    pub fn live_vm(&self, id_or_name: &str) -> Result<Arc<LiveVm>, ApiError> {
        let info = self.vm_info(id_or_name)?;
        self.vm_runtime
            .get(&info.id)
            .ok_or_else(|| ApiError::Conflict(format!("VM '{}' is {}: start it first", info.name, info.state.as_str())))
    }

    /// The running VM that attaches pool disk `disk` read-write, its device id for the disk and
    /// its name.
    pub(super) fn running_vm_with_disk(&self, disk: &str) -> Result<Option<(Arc<LiveVm>, String, String)>, ApiError> {
        for row in self.store.list_vms()? {
            let Some(live) = self.vm_runtime.get(&row.id) else {
                continue;
            };
            let def = definition_of(&row.definition)?;
            if let Some(i) = def.disks.iter().position(|d| d.disk == disk && !d.read_only) {
                return Ok(Some((live, format!("disk{i}"), row.name)));
            }
        }
        Ok(None)
    }

    /// Records a VM's new state and publishes it.
    pub(super) fn vm_transition(
        &self,
        id: &str,
        name: &str,
        previous: VmState,
        state: VmState,
        message: Option<String>,
    ) -> Result<(), ApiError> {
        self.store.set_vm_state(id, state.as_str())?;
        self.publish_vm(id, name, previous, state, message);
        Ok(())
    }

    pub(super) fn publish_vm(&self, id: &str, name: &str, previous: VmState, state: VmState, message: Option<String>) {
        tracing::info!(vm = %id, %name, from = previous.as_str(), to = state.as_str(), message = message.as_deref().unwrap_or(""), "VM state");
        self.events.publish(Change {
            kind: EventKind::Vm,
            id: id.to_owned(),
            name: Some(name.to_owned()),
            state: state.as_str().to_owned(),
            previous: Some(previous.as_str().to_owned()),
            message,
        });
    }

    /// Starts a VM that is not running; its pending definition, if any, takes effect.
    pub async fn start_vm(self: &Arc<Self>, id_or_name: &str) -> Result<VmInfo, ApiError> {
        let (row, _held) = self.lock_vm(id_or_name).await?;
        let id = row.id;
        self.start_vm_locked(&id).await
    }

    /// Starts VM `id`, its gate held.
    pub(super) async fn start_vm_locked(self: &Arc<Self>, id: &str) -> Result<VmInfo, ApiError> {
        self.start_vm_from(id, None).await
    }

    /// Starts VM `id`, its gate held: booted, or (`incoming`) continuing from a saved state,
    /// running or paused as it says.
    pub(super) async fn start_vm_from(
        self: &Arc<Self>,
        id: &str,
        incoming: Option<super::vm_fork::Incoming<'_>>,
    ) -> Result<VmInfo, ApiError> {
        let row = self.vm_row(id)?;
        let before = state_of(&row)?;
        if before.is_active() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is already {}",
                row.name,
                before.as_str()
            )));
        }
        let mut def = definition_of(row.pending_definition.as_deref().unwrap_or(&row.definition))?;
        self.check_not_a_base(&row.name, &writable_disks(&def))?;
        let ejected = eject_after_first_boot(&mut def, row.starts);
        self.vm_transition(&row.id, &row.name, before, VmState::Starting, None)?;
        let launched = match incoming {
            None => self.launch_vm(&row.id, &row.name, &def, false).await,
            Some(incoming) => self.launch_vm_incoming(&row.id, &row.name, &def, incoming).await,
        };
        let now = match incoming {
            Some(i) if i.paused => VmState::Paused,
            _ => VmState::Running,
        };
        let live = match launched {
            Ok(live) => live,
            Err(err) => {
                self.store
                    .set_vm_exited(&row.id, before.as_str(), &format!("start failed: {err}"))?;
                self.publish_vm(
                    &row.id,
                    &row.name,
                    VmState::Starting,
                    before,
                    Some(format!("start failed: {err}")),
                );
                return Err(err);
            }
        };
        let identity = live.machine.identity();
        self.store
            .set_vm_started(&row.id, &to_json(&def)?, now.as_str(), identity)?;
        self.vm_runtime.insert(live.clone());
        let message = match incoming {
            Some(_) => Some("continued from a saved state (fork)".to_owned()),
            None => (!ejected.is_empty()).then(|| format!("ejected after first boot: {}", ejected.join(", "))),
        };
        self.publish_vm(&row.id, &row.name, VmState::Starting, now, message);
        if row.starts == 0 {
            self.eject_at_first_reboot(&live, &def);
        }
        self.supervise_vm(live);
        self.vm_info(&row.id)
    }

    /// Launches VM `id`'s QEMU (`incoming`: waiting for a saved state) and attaches its console.
    pub(super) async fn launch_vm(
        &self,
        id: &str,
        name: &str,
        def: &VmDefinition,
        incoming: bool,
    ) -> Result<Arc<LiveVm>, ApiError> {
        let vm_dir = self.vm_dir(id);
        let run_dir = self.vm_run_dir(id);
        for dir in [&vm_dir, &run_dir] {
            std::fs::create_dir_all(dir)
                .and_then(|()| {
                    use std::os::unix::fs::PermissionsExt as _;
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
        }
        let mut spec = self.machine_spec(id, name, def).await?;
        spec.incoming = incoming;
        let machine = self
            .qemu
            .launch_machine(&spec)
            .await
            .map_err(|e| super::vm_spec::launch_error(name, e))?;
        // A fork continues an agent that may have been initialized: probed like a taken-over one.
        Ok(LiveVm::new(
            id,
            machine,
            self.vm_console_log_path(id),
            def.sandbox_kernel,
            incoming,
        ))
    }

    /// Installers reboot into what they installed: at the guest's first reboot, the drives marked
    /// "eject after first boot" are emptied, in the running VM and in its stored definition.
    fn eject_at_first_reboot(self: &Arc<Self>, live: &Arc<LiveVm>, def: &VmDefinition) {
        let drives: Vec<usize> = def
            .cdroms
            .iter()
            .enumerate()
            .filter(|(_, cd)| cd.eject_after_first_boot && cd.iso.is_some())
            .map(|(i, _)| i)
            .collect();
        if drives.is_empty() {
            return;
        }
        let (manager, live) = (self.clone(), live.clone());
        tokio::spawn(async move {
            let mut resets = live.machine.resets();
            let mut exit = live.machine.exit();
            tokio::select! {
                changed = resets.changed() => if changed.is_err() { return },
                _ = exit.wait_for(Option::is_some) => return,
            }
            let mut ejected = Vec::new();
            for &i in &drives {
                match live.machine.eject(&format!("cd{i}")).await {
                    Ok(()) => ejected.push(i),
                    Err(err) => tracing::warn!(vm = %live.id, drive = i, error = %err, "ejecting an installer failed"),
                }
            }
            let Ok(row) = manager.vm_row(&live.id) else { return };
            let media: Vec<(usize, Option<&str>)> = ejected.iter().map(|&i| (i, None)).collect();
            if let Err(err) = manager.store_media(&row, &media) {
                tracing::warn!(vm = %live.id, error = %err, "recording ejected installers failed");
                return;
            }
            let state = state_of(&row).unwrap_or(VmState::Running);
            manager.publish_vm(
                &row.id,
                &row.name,
                state,
                state,
                Some("installer media ejected at the first reboot".into()),
            );
        });
    }

    /// Watches `live`'s QEMU: records how it ended and applies the restart policy.
    pub(super) fn supervise_vm(self: &Arc<Self>, live: Arc<LiveVm>) {
        let manager = self.clone();
        tokio::spawn(async move {
            let exit = live.machine.wait_exit().await;
            if live.detached.load(Ordering::SeqCst) {
                return;
            }
            live.console.close();
            manager.vm_runtime.remove(&live);
            let asked = live.stop_reason.lock().expect("stop reason lock").take();
            let (state, reason) = match asked {
                Some(why) => (VmState::Stopped, why),
                None if !exit.cause.is_crash() => (VmState::Stopped, "the guest powered off".to_owned()),
                None if exit.cause == viv_vmm::ExitCause::GuestPanic => {
                    (VmState::Crashed, format!("the guest kernel panicked ({})", exit.reason))
                }
                None => (VmState::Crashed, exit.reason.clone()),
            };
            let ran = live.started.elapsed();
            let recorded = manager.vm_row(&live.id).and_then(|row| {
                let previous = state_of(&row)?;
                manager.store.set_vm_exited(&row.id, state.as_str(), &reason)?;
                manager.publish_vm(&row.id, &row.name, previous, state, Some(reason.clone()));
                Ok(row)
            });
            // `send_replace` stores the value even while nobody subscribes yet (a stop subscribes
            // after it killed QEMU, which may be after this).
            live.recorded.send_replace(true);
            match recorded {
                Ok(row) if state == VmState::Crashed => manager.after_crash(&row.id, ran),
                Ok(_) => {}
                Err(err) => tracing::warn!(vm = %live.id, error = %err, "recording a VM's exit failed"),
            }
        });
    }

    /// Applies the restart policy to VM `id`, which crashed after running for `ran`.
    pub(super) fn after_crash(self: &Arc<Self>, id: &str, ran: Duration) {
        let Ok(row) = self.vm_row(id) else { return };
        let Ok(def) = definition_of(&row.definition) else {
            return;
        };
        if def.restart_policy != RestartPolicy::OnFailure {
            self.vm_runtime.restart_delays.lock().expect("delays lock").remove(id);
            return;
        }
        let delay = {
            let mut delays = self.vm_runtime.restart_delays.lock().expect("delays lock");
            let delay = match delays.get(id) {
                Some(last) if ran < STABLE_RUN => (*last * 2).min(MAX_RESTART_DELAY),
                _ => FIRST_RESTART_DELAY,
            };
            delays.insert(id.to_owned(), delay);
            delay
        };
        tracing::info!(vm = %id, delay_ms = delay.as_millis() as u64, "restarting a crashed VM (restart policy on-failure)");
        let manager = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let gate = manager.vm_runtime.gate(&id);
            let _held = gate.lock().await;
            // Started, deleted or edited meanwhile: the operator has taken over.
            let still_crashed = manager
                .vm_row(&id)
                .ok()
                .and_then(|row| state_of(&row).ok())
                .is_some_and(|s| s == VmState::Crashed);
            if still_crashed {
                if let Err(err) = manager.start_vm_locked(&id).await {
                    tracing::warn!(vm = %id, error = %err, "restarting a crashed VM failed");
                }
            }
        });
    }

    /// Stops a running or paused VM: the ACPI power button, then, after the timeout (the
    /// definition's unless given), a forced power-off; `force` powers it off at once.
    pub async fn stop_vm(
        self: &Arc<Self>,
        id_or_name: &str,
        force: bool,
        timeout_secs: Option<u32>,
    ) -> Result<VmInfo, ApiError> {
        check_stop_timeout(timeout_secs)?;
        let (row, _held) = self.lock_vm(id_or_name).await?;
        let id = row.id;
        self.stop_vm_locked(&id, force, timeout_secs).await?;
        self.vm_info(&id)
    }

    async fn stop_vm_locked(&self, id: &str, force: bool, timeout_secs: Option<u32>) -> Result<(), ApiError> {
        let row = self.vm_row(id)?;
        let live = self.live_of(&row)?;
        if force {
            live.ask_to_stop("forced off (stop --force)");
            live.machine
                .kill()
                .await
                .map_err(|e| ApiError::Internal(format!("killing VM '{}': {e}", row.name)))?;
            live.exit_recorded().await;
            return Ok(());
        }
        let timeout = Duration::from_secs(u64::from(
            timeout_secs.unwrap_or(definition_of(&row.definition)?.stop_timeout_secs),
        ));
        let before = state_of(&row)?;
        self.vm_transition(&row.id, &row.name, before, VmState::Stopping, None)?;
        if before == VmState::Paused {
            // A paused guest cannot see the power button.
            let _ = live.machine.resume().await;
        }
        live.ask_to_stop("powered off (ACPI)");
        if let Err(err) = live.machine.power_off().await {
            tracing::warn!(vm = %row.id, error = %err, "pressing the power button failed; forcing the VM off");
        }
        let mut exit = live.machine.exit();
        let timed_out = tokio::time::timeout(timeout, async { exit.wait_for(Option::is_some).await.is_ok() })
            .await
            .is_err();
        if timed_out {
            live.ask_to_stop(format!(
                "forced off: the guest did not power off within {} s of the ACPI power button",
                timeout.as_secs()
            ));
            live.machine
                .kill()
                .await
                .map_err(|e| ApiError::Internal(format!("killing VM '{}': {e}", row.name)))?;
        }
        live.exit_recorded().await;
        Ok(())
    }

    /// Kills a VM at once (pulling the plug).
    pub async fn kill_vm(self: &Arc<Self>, id_or_name: &str) -> Result<VmInfo, ApiError> {
        let (row, _held) = self.lock_vm(id_or_name).await?;
        let id = row.id.clone();
        let live = self.live_of(&row)?;
        live.ask_to_stop("killed");
        live.machine
            .kill()
            .await
            .map_err(|e| ApiError::Internal(format!("killing VM '{}': {e}", row.name)))?;
        live.exit_recorded().await;
        self.vm_info(&id)
    }

    /// Stops, then starts a VM (its pending definition takes effect); starts a VM that is not
    /// running.
    pub async fn restart_vm(
        self: &Arc<Self>,
        id_or_name: &str,
        force: bool,
        timeout_secs: Option<u32>,
    ) -> Result<VmInfo, ApiError> {
        check_stop_timeout(timeout_secs)?;
        let (row, _held) = self.lock_vm(id_or_name).await?;
        let id = row.id;
        if self.vm_runtime.get(&id).is_some() {
            self.stop_vm_locked(&id, force, timeout_secs).await?;
        }
        self.start_vm_locked(&id).await
    }

    /// Pauses a running VM (its vCPUs stop; memory is kept).
    pub async fn pause_vm(self: &Arc<Self>, id_or_name: &str) -> Result<VmInfo, ApiError> {
        self.pause_or_resume(id_or_name, true).await
    }

    /// Lets a paused VM run again.
    pub async fn resume_vm(self: &Arc<Self>, id_or_name: &str) -> Result<VmInfo, ApiError> {
        self.pause_or_resume(id_or_name, false).await
    }

    async fn pause_or_resume(self: &Arc<Self>, id_or_name: &str, pause: bool) -> Result<VmInfo, ApiError> {
        let (row, _held) = self.lock_vm(id_or_name).await?;
        let id = row.id.clone();
        let live = self.live_of(&row)?;
        let state = state_of(&row)?;
        let (from, to) = if pause {
            (VmState::Running, VmState::Paused)
        } else {
            (VmState::Paused, VmState::Running)
        };
        if state != from {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is {}, not {}",
                row.name,
                state.as_str(),
                from.as_str()
            )));
        }
        let done = if pause {
            live.machine.pause().await.map_err(|e| e.to_string())
        } else {
            live.machine.resume().await.map_err(|e| e.to_string())
        };
        done.map_err(|e| ApiError::Internal(format!("VM '{}': {e}", row.name)))?;
        self.vm_transition(&row.id, &row.name, from, to, None)?;
        self.vm_info(&id)
    }

    /// The live VM of `row`, or 409 saying what state it is in.
    pub(super) fn live_of(&self, row: &crate::store::VmRow) -> Result<Arc<LiveVm>, ApiError> {
        self.vm_runtime.get(&row.id).ok_or_else(|| {
            ApiError::Conflict(format!(
                "VM '{}' is {}, not running",
                row.name,
                state_of(row).map(|s| s.as_str()).unwrap_or("in an unknown state")
            ))
        })
    }

    /// Deletes a VM that is not running, with its files (NVRAM, console log); its disks stay in
    /// the storage pool or, with [`DiskDisposal::Delete`], those it alone attached read-write
    /// are deleted too. Returns the disks deleted.
    pub async fn delete_vm(self: &Arc<Self>, id_or_name: &str, disks: DiskDisposal) -> Result<Vec<String>, ApiError> {
        let (row, _held) = self.lock_vm(id_or_name).await?;
        let id = row.id.clone();
        let def = definition_of(&row.definition)?;
        let pending = row.pending_definition.as_deref().map(definition_of).transpose()?;
        self.delete_vm_row(&row)?;
        self.drop_vm_snapshots(&row).await;
        self.drop_vm_backups(&row);
        self.vm_runtime.gates.lock().expect("VM gates lock").remove(&id);
        self.vm_runtime.restart_delays.lock().expect("delays lock").remove(&id);
        let _ = std::fs::remove_dir_all(self.vm_dir(&id));
        let mut deleted = Vec::new();
        if disks == DiskDisposal::Delete {
            let others = self.vm_devices()?;
            let mut names: Vec<&str> = def
                .disks
                .iter()
                .chain(pending.iter().flat_map(|p| p.disks.iter()))
                .filter(|d| !d.read_only && !d.shareable)
                .map(|d| d.disk.as_str())
                .collect();
            names.sort();
            names.dedup();
            for name in names {
                let user = |disk: &str| super::storage::describe_vms(&others.disk_users(disk));
                match self.storage.delete_disk(name, user).await {
                    Ok(()) => deleted.push(name.to_owned()),
                    Err(err) => tracing::warn!(vm = %id, disk = %name, error = %err, "keeping a disk of a deleted VM"),
                }
            }
        }
        Ok(deleted)
    }
}

/// Refuses a stop timeout out of range.
fn check_stop_timeout(timeout_secs: Option<u32>) -> Result<(), ApiError> {
    match timeout_secs {
        Some(t) if !(1..=viv_api::vms::MAX_VM_STOP_TIMEOUT_SECS).contains(&t) => Err(ApiError::BadRequest(format!(
            "timeoutSecs must be between 1 and {}, got {t}",
            viv_api::vms::MAX_VM_STOP_TIMEOUT_SECS
        ))),
        _ => Ok(()),
    }
}

/// Takes the media out of drives marked "eject after first boot" once the VM has started
/// before (`starts`); returns the ISOs taken out.
fn eject_after_first_boot(def: &mut VmDefinition, starts: u32) -> Vec<String> {
    if starts == 0 {
        return Vec::new();
    }
    def.cdroms
        .iter_mut()
        .filter(|cd| cd.eject_after_first_boot)
        .filter_map(|cd| {
            cd.eject_after_first_boot = false;
            cd.iso.take()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use viv_api::vms::VmCdrom;

    #[test]
    fn installers_are_ejected_from_the_second_start_on() {
        let mut def = VmDefinition {
            cdroms: vec![
                VmCdrom {
                    iso: Some("installer".into()),
                    eject_after_first_boot: true,
                    ..VmCdrom::default()
                },
                VmCdrom {
                    iso: Some("drivers".into()),
                    eject_after_first_boot: false,
                    ..VmCdrom::default()
                },
            ],
            ..VmDefinition::default()
        };
        assert!(eject_after_first_boot(&mut def, 0).is_empty());
        assert_eq!(eject_after_first_boot(&mut def, 1), vec!["installer"]);
        assert_eq!(def.cdroms[0], VmCdrom::default());
        assert_eq!(def.cdroms[1].iso.as_deref(), Some("drivers"));
    }
}
