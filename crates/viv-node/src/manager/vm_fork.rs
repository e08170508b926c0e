//! Forks of running VMs: a new VM (new name, id, SMBIOS UUID and MACs) whose disks hold the
//! source's disks as they were at one instant and whose memory and devices continue from that
//! instant; both VMs run on.
//!
//! How: with the source's vCPUs stopped, each writable disk gets an internal snapshot (a qcow2
//! metadata operation), the NVRAM is copied, and memory and device state are saved through
//! QEMU's migration into a file; then the source runs again. Its pause is that save, nothing
//! more. The fork's disks are then copied out of the internal snapshots (`qemu-img convert -U
//! -l`, while the source runs: a snapshot's clusters are copy-on-write, so the source never
//! changes them), the snapshots are deleted from the source, and the fork's QEMU starts with
//! `-incoming defer` and loads the state.
//!
//! Why copies and not linked overlays: a linked clone needs a frozen base, so the source would
//! have to move onto an overlay of its own named pool disk. Its disk would become a layer under
//! a new name, its internal snapshots (`viv vm snapshot`) would be stranded in that base, and
//! its QEMU block nodes would change names under the operations that address them (resize,
//! snapshots, I/O limits). Copying from an internal snapshot leaves the source exactly as it
//! was and still pauses it only for the memory save.
//!
//! Invariants:
//! - the source's gate is held throughout, so no stop, snapshot or edit runs beside a fork;
//! - the disks' snapshot, the NVRAM copy and the saved state describe one instant (all taken
//!   with the vCPUs stopped), and the source ends in the state it had (running or paused);
//! - the fork's network cards get new MACs in its definition; a guest that already read its
//!   card's address keeps it in memory (virtio-net's state carries it) until it reboots;
//! - a fork that fails leaves nothing: its disks and VM row are deleted, the internal snapshots
//!   removed from the source, the state file deleted.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use viv_api::vms::{Firmware, NewVm, VmFork, VmInfo, VmState};

use super::vm_runtime::LiveVm;
use super::vms::{definition_of, state_of};
use super::Manager;
use crate::error::ApiError;

/// A saved state a VM starts from.
#[derive(Debug, Clone, Copy)]
pub(super) struct Incoming<'a> {
    /// The migration stream.
    pub state: &'a Path,
    /// Stay paused once loaded.
    pub paused: bool,
}

impl Manager {
    /// Forks running or paused VM `source` into a new VM named `req.name`.
    pub async fn fork_vm(self: &Arc<Self>, source: &str, req: VmFork) -> Result<VmInfo, ApiError> {
        super::check_name("VM", &req.name)?;
        let (row, _held) = self.lock_vm(source).await?;
        let state = state_of(&row)?;
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is {}: a fork continues a running or paused VM's memory; start it first, or clone it (viv vm clone)",
                row.name,
                state.as_str()
            )));
        }
        if self.store.vm(&req.name)?.is_some() {
            return Err(ApiError::Conflict(format!("a VM named '{}' already exists", req.name)));
        }
        let live = self.live_of(&row)?;
        self.check_devices_as_started(&row.name, &live).await?;
        let mut def = definition_of(&row.definition)?;
        // (index in the definition, source disk, fork's disk)
        let mut copies: Vec<(usize, String, String)> = Vec::new();
        for (i, disk) in def.disks.iter().enumerate() {
            if disk.read_only || disk.shareable {
                continue;
            }
            let info = self.storage.disk_info(&disk.disk).await.map_err(|e| {
                super::storage::api(e.kind(), format!("disk '{}' of VM '{}': {e}", disk.disk, row.name))
            })?;
            if info.format != viv_storage::DiskFormat::Qcow2 {
                return Err(ApiError::Conflict(format!(
                    "VM '{}': disk '{}' is raw: a fork needs qcow2 disks (clone it to a qcow2 disk first)",
                    row.name, disk.disk
                )));
            }
            let name = format!("{}-disk{i}", req.name);
            if viv_storage::name::check(&name).is_err() {
                return Err(ApiError::BadRequest(format!(
                    "the fork's disks are named '{name}', which is not a valid disk name (at most 64 characters): choose a shorter VM name"
                )));
            }
            if self.storage.disk_info(&name).await.is_ok() {
                return Err(ApiError::Conflict(format!(
                    "disk '{name}' exists already: the fork's disks would take that name; choose another VM name or delete the disk"
                )));
            }
            copies.push((i, disk.disk.clone(), name));
        }
        let tag = format!("vmfork-{}", super::random_id(12));
        let scratch = self.config.data_dir.join("vms").join(format!(".{tag}"));
        let started = Instant::now();
        let forked = self
            .fork_into(&live, &row.id, &mut def, &copies, &tag, &scratch, state, &req.name)
            .await;
        let _ = std::fs::remove_dir_all(&scratch);
        match &forked {
            Ok(info) => tracing::info!(
                source = %row.id,
                fork = %info.id,
                ms = started.elapsed().as_millis() as u64,
                "VM forked"
            ),
            Err(err) => tracing::warn!(source = %row.id, error = %err, "VM fork failed"),
        }
        forked
    }

    #[allow(clippy::too_many_arguments)]
    async fn fork_into(
        self: &Arc<Self>,
        live: &Arc<LiveVm>,
        source_id: &str,
        def: &mut viv_api::vms::VmDefinition,
        copies: &[(usize, String, String)],
        tag: &str,
        scratch: &Path,
        state: VmState,
        name: &str,
    ) -> Result<VmInfo, ApiError> {
        let internal = |what: &str, e: &dyn std::fmt::Display| ApiError::Internal(format!("forking: {what}: {e}"));
        std::fs::create_dir_all(scratch).map_err(|e| internal("creating its scratch directory", &e))?;
        let state_file = scratch.join("state");
        let nvram = (def.firmware == Firmware::Uefi).then(|| scratch.join("nvram.fd"));
        let pause_started = Instant::now();
        let point = self
            .fork_point(live, tag, &state_file, nvram.as_deref(), source_id)
            .await;
        let resumed = match state {
            VmState::Running => live
                .machine
                .resume()
                .await
                .map_err(|e| internal("resuming the source", &e)),
            _ => Ok(()),
        };
        let paused_ms = pause_started.elapsed().as_millis() as u64;
        if let Err(err) = point.and(resumed) {
            live.machine.unmark_disks(tag).await;
            return Err(err);
        }
        tracing::info!(vm = %source_id, paused_ms, "VM fork point saved");
        let mut made: Vec<String> = Vec::new();
        let mut outcome = Ok(());
        for (_, from, to) in copies {
            match self.storage.copy_disk_snapshot(from, tag, to, &mut |_| {}).await {
                Ok(_) => made.push(to.clone()),
                Err(err) => {
                    outcome = Err(super::storage::api(
                        err.kind(),
                        format!("copying disk '{from}' for the fork: {err}"),
                    ));
                    break;
                }
            }
        }
        live.machine.unmark_disks(tag).await;
        let created = outcome.and_then(|()| {
            for (i, _, to) in copies {
                def.disks[*i].disk = to.clone();
            }
            for nic in &mut def.nics {
                nic.mac = None;
            }
            def.autostart.enabled = false;
            self.create_vm(NewVm::new(name, def.clone()))
        });
        let started = match created {
            Ok(info) => self.start_vm_fork(&info, nvram.as_deref(), &state_file, state).await,
            Err(err) => Err(err),
        };
        if started.is_err() {
            if let Ok(Some(row)) = self.store.vm(name) {
                let _ = self.delete_vm_row(&row);
                let _ = std::fs::remove_dir_all(self.vm_dir(&row.id));
            }
            for disk in made.iter().rev() {
                let _ = self.storage.delete_disk(disk, viv_storage::unused).await;
            }
        }
        started
    }

    /// With the source's vCPUs stopped: its disks marked, its NVRAM copied, its state saved.
    async fn fork_point(
        &self,
        live: &Arc<LiveVm>,
        tag: &str,
        state_file: &Path,
        nvram: Option<&Path>,
        source_id: &str,
    ) -> Result<(), ApiError> {
        let failed = |what: &str, e: &dyn std::fmt::Display| ApiError::Internal(format!("forking: {what}: {e}"));
        live.machine
            .stop_vcpus()
            .await
            .map_err(|e| failed("stopping the source", &e))?;
        live.machine
            .mark_disks(tag)
            .await
            .map_err(|e| failed("marking the source's disks", &e))?;
        if let Some(copy) = nvram {
            std::fs::copy(self.vm_ovmf(source_id).nvram, copy).map_err(|e| failed("copying the NVRAM", &e))?;
        }
        // Guest memory: the server's alone.
        let file = {
            use std::os::unix::fs::OpenOptionsExt as _;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(state_file)
                .map_err(|e| failed("creating the state file", &e))?
        };
        live.machine
            .save_state(file)
            .await
            .map_err(|e| failed("saving the source's memory and devices", &e))
    }

    /// Starts fork `info` from the saved state, in the source's state.
    async fn start_vm_fork(
        self: &Arc<Self>,
        info: &VmInfo,
        nvram: Option<&Path>,
        state_file: &Path,
        state: VmState,
    ) -> Result<VmInfo, ApiError> {
        let gate = self.vm_runtime.gate(&info.id);
        let _held = gate.lock().await;
        if let Some(copy) = nvram {
            let dir = self.vm_dir(&info.id);
            std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::rename(copy, self.vm_ovmf(&info.id).nvram))
                .map_err(|e| ApiError::Internal(format!("forking: placing the NVRAM: {e}")))?;
        }
        self.start_vm_from(
            &info.id,
            Some(Incoming {
                state: state_file,
                paused: state == VmState::Paused,
            }),
        )
        .await
    }

    /// At start: removes the scratch directories (saved state, NVRAM copy) of forks a stopped
    /// server left unfinished. (Their internal snapshots stay in the source's disks, named
    /// `vmfork-*`; they cost space only.)
    pub(super) fn remove_fork_leftovers(&self) {
        let dir = self.config.data_dir.join("vms");
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_name().to_string_lossy().starts_with(".vmfork-") {
                tracing::info!(dir = %entry.path().display(), "removing an unfinished fork's files");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Launches VM `id` waiting for a state, loads `incoming` into it and lets it run unless
    /// it stays paused. A machine that fails to load is killed.
    pub(super) async fn launch_vm_incoming(
        &self,
        id: &str,
        name: &str,
        def: &viv_api::vms::VmDefinition,
        incoming: Incoming<'_>,
    ) -> Result<Arc<LiveVm>, ApiError> {
        let live = self.launch_vm(id, name, def, true).await?;
        let loaded = async {
            let file = std::fs::File::open(incoming.state).map_err(|e| e.to_string())?;
            live.machine.load_state(file).await.map_err(|e| e.to_string())?;
            if !incoming.paused {
                live.machine.resume().await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }
        .await;
        match loaded {
            Ok(()) => Ok(live),
            Err(err) => {
                let _ = live.machine.kill().await;
                live.console.close();
                Err(ApiError::Internal(format!(
                    "VM '{name}' did not continue from the saved state: {err}"
                )))
            }
        }
    }
}
