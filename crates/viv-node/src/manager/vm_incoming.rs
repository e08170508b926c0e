//! The destination side of a live migration: a VM received from another Vivarium server.
//!
//! [`Manager::receive_vm`] defines the VM under its name, creates its writable disks empty (same
//! names, formats and sizes), launches its QEMU in its own jail with `-incoming defer`, exports
//! the new disks over NBD and listens for the RAM stream (both on Unix sockets in the VM's run
//! directory; see `viv_vmm::machine` `migrate`). The source server then opens channels
//! ([`Manager::incoming_channel`], relayed by the routes over upgraded HTTP connections), mirrors
//! the disks and sends RAM, and calls [`Manager::finish_incoming`], which waits for the stream,
//! lets the VM run and hands it to the supervisor like any started VM.
//!
//! Invariants:
//! - until it is finished, an incoming VM is this server's only through the registry here: it is
//!   `starting`, no start, stop or delete can take its gate from the receiver (held throughout
//!   by the registry entry; `lock_vm` answers them 409 naming the migration), and it is not supervised (its QEMU's exit is not recorded as a crash);
//! - an incoming migration that fails, is aborted ([`Manager::abort_incoming`]), is not
//!   finished within [`INCOMING_DEADLINE`] or is pending when the server shuts down leaves
//!   nothing: its QEMU is killed, its disks, VM row
//!   and files are deleted;
//! - only disks it created are deleted on failure: a name clash (VM or disk) is refused before
//!   anything is made;
//! - between nodes of one cluster (`takeoverFrom`), the VM's row is the source node's until
//!   the finish takes it over (`Store::take_over_vm`, conditional on the row still naming the
//!   source); nothing here writes it before, and a failure leaves it alone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use viv_api::vms::{IncomingMigration, IncomingVm, NewVm, VmInfo, VmState};

use super::vm_runtime::LiveVm;
use super::vms::{definition_of, to_json};
use super::Manager;
use crate::error::ApiError;

/// An incoming VM not finished by then is deleted.
pub const INCOMING_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// Largest disk received (64 TiB).
const MAX_DISK_BYTES: u64 = 64 << 40;

/// How long [`Manager::finish_incoming`] waits for the RAM stream to complete.
const FINISH_TIMEOUT: Duration = Duration::from_secs(120);

/// Incoming VMs not finished yet, by incoming id.
#[derive(Default)]
pub struct IncomingRegistry {
    pending: Mutex<HashMap<String, Pending>>,
}

struct Pending {
    vm_id: String,
    name: String,
    /// The node whose row this VM takes over when it finishes (a move within a cluster).
    takeover_from: Option<String>,
    live: Arc<LiveVm>,
    /// Disks this migration created.
    disks: Vec<String>,
    /// The VM's gate, held until the VM is finished or deleted.
    _gate: tokio::sync::OwnedMutexGuard<()>,
}

impl IncomingRegistry {
    /// The incoming migration receiving VM `vm_id`, if one is.
    pub(super) fn receiving(&self, vm_id: &str) -> Option<String> {
        self.pending
            .lock()
            .expect("incoming lock")
            .iter()
            .find(|(_, p)| p.vm_id == vm_id)
            .map(|(id, _)| id.clone())
    }

    fn take(&self, id: &str) -> Result<Pending, ApiError> {
        self.pending
            .lock()
            .expect("incoming lock")
            .remove(id)
            .ok_or_else(|| ApiError::NotFound(format!("no incoming migration '{id}'")))
    }
}

/// Which channel of an incoming migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// QEMU's RAM and device stream.
    Ram,
    /// The NBD server exporting the new disks.
    Nbd,
}

impl Manager {
    /// Receives VM `req`: defines it, creates its disks, launches its QEMU waiting for the
    /// stream. 409 when its name, a disk name or a MAC address is taken here; 400 when an ISO or
    /// read-only disk it uses is not in this server's pool.
    pub async fn receive_vm(self: &Arc<Self>, req: IncomingVm) -> Result<IncomingMigration, ApiError> {
        super::check_name("VM", &req.name)?;
        let takeover = match req.takeover_from.as_deref() {
            Some(from) => Some(self.row_to_take_over(&req.name, from)?),
            None => None,
        };
        let def = match &takeover {
            // The shared store's definition, not what the request says.
            Some(row) => definition_of(&row.definition)?,
            None => req.definition,
        };
        if takeover.is_none() && self.store.vm(&req.name)?.is_some() {
            return Err(ApiError::Conflict(format!(
                "a VM named '{}' already exists on the target server",
                req.name
            )));
        }
        let writable: Vec<&str> = def
            .disks
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| d.disk.as_str())
            .collect();
        let mut given: Vec<&str> = req.disks.iter().map(|d| d.name.as_str()).collect();
        let mut wanted = writable.clone();
        given.sort();
        wanted.sort();
        if given != wanted {
            return Err(ApiError::BadRequest(
                "disks must list exactly the definition's writable disks".into(),
            ));
        }
        for disk in &req.disks {
            super::vms::check_pool_name("disk", &disk.name)?;
            if disk.size_bytes == 0 || disk.size_bytes > MAX_DISK_BYTES {
                return Err(ApiError::BadRequest(format!(
                    "disk '{}': sizeBytes {} is out of range",
                    disk.name, disk.size_bytes
                )));
            }
            if self.storage.disk_info(&disk.name).await.is_ok() {
                return Err(ApiError::Conflict(format!(
                    "a disk named '{}' already exists on the target server",
                    disk.name
                )));
            }
        }
        self.check_shared_media_here(&def, "the target server's").await?;
        let mut made = Vec::new();
        let mut outcome = Ok(());
        for disk in &req.disks {
            match self
                .storage
                .create_disk(&disk.name, super::storage::format_of(disk.format), disk.size_bytes)
                .await
            {
                Ok(_) => made.push(disk.name.clone()),
                Err(err) => {
                    outcome = Err(super::storage::api(
                        err.kind(),
                        format!("creating disk '{}': {err}", disk.name),
                    ));
                    break;
                }
            }
        }
        if let (Some(row), Ok(())) = (&takeover, &outcome) {
            return match self
                .launch_incoming(&row.id, &row.name, &def, made.clone(), req.takeover_from)
                .await
            {
                Ok(id) => Ok(IncomingMigration {
                    id,
                    vm: self.vm_info(&row.id)?,
                }),
                Err(err) => {
                    self.remove_vm_files(&row.id, &made).await;
                    Err(err)
                }
            };
        }
        let created = outcome.and_then(|()| {
            let mut def = def.clone();
            def.autostart.enabled = false;
            self.create_vm(NewVm::new(&req.name, def))
        });
        let info = match created {
            Ok(info) => info,
            Err(err) => {
                self.delete_disks(&made).await;
                return Err(err);
            }
        };
        let launched = match self.vm_transition(&info.id, &info.name, VmState::Defined, VmState::Starting, None) {
            Ok(()) => {
                self.launch_incoming(&info.id, &info.name, &info.definition, made.clone(), None)
                    .await
            }
            Err(err) => Err(err),
        };
        match launched {
            Ok(id) => Ok(IncomingMigration {
                id,
                vm: self.vm_info(&info.id)?,
            }),
            Err(err) => {
                self.remove_incoming_vm(&info.id, &made).await;
                Err(err)
            }
        }
    }

    /// 400 unless the ISOs and read-only disks `def` uses are in this server's pool (`whose`
    /// names it in the message): they are not copied with a VM.
    pub(super) async fn check_shared_media_here(
        &self,
        def: &viv_api::vms::VmDefinition,
        whose: &str,
    ) -> Result<(), ApiError> {
        for disk in def.disks.iter().filter(|d| d.read_only) {
            if self.storage.disk_info(&disk.disk).await.is_err() {
                return Err(ApiError::BadRequest(format!(
                    "read-only disk '{}' is not in {whose} pool: copy it there first",
                    disk.disk
                )));
            }
        }
        for iso in def.cdroms.iter().filter_map(|c| c.iso.as_deref()) {
            if self.storage.iso(iso).await.is_err() {
                return Err(ApiError::BadRequest(format!(
                    "ISO '{iso}' is not in {whose} pool: upload it there first"
                )));
            }
        }
        Ok(())
    }

    /// 409 unless VM `row` is held by node `from`, another node than this one (a move here,
    /// live or by copying).
    pub(super) fn check_moving_from(&self, row: &crate::store::VmRow, from: &str) -> Result<(), ApiError> {
        let holder = self.store.vm_node(&row.id)?.flatten();
        if holder.as_deref() != Some(from) || from == self.node_id() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is not held by node {from}: it cannot move here from there",
                row.name
            )));
        }
        Ok(())
    }

    /// The row of VM `name` that node `from` holds and runs, for a move to this node.
    fn row_to_take_over(&self, name: &str, from: &str) -> Result<crate::store::VmRow, ApiError> {
        let row = self.vm_row(name)?;
        self.check_moving_from(&row, from)?;
        if super::vms::state_of(&row)? != VmState::Running {
            return Err(ApiError::Conflict(format!(
                "VM '{name}' is not running: only a running VM moves live"
            )));
        }
        Ok(row)
    }

    async fn launch_incoming(
        self: &Arc<Self>,
        vm_id: &str,
        name: &str,
        def: &viv_api::vms::VmDefinition,
        disks: Vec<String>,
        takeover_from: Option<String>,
    ) -> Result<String, ApiError> {
        let gate = self.vm_runtime.gate(vm_id).lock_owned().await;
        let live = self.launch_vm(vm_id, name, def, true).await?;
        if let Err(err) = live.machine.receive().await {
            let _ = live.machine.kill().await;
            live.console.close();
            return Err(ApiError::Internal(format!(
                "VM '{name}': its QEMU could not wait for the migration: {err}"
            )));
        }
        let id = format!("in-{}", super::random_id(16));
        self.incoming.pending.lock().expect("incoming lock").insert(
            id.clone(),
            Pending {
                vm_id: vm_id.to_owned(),
                name: name.to_owned(),
                takeover_from,
                live,
                disks,
                _gate: gate,
            },
        );
        tracing::info!(incoming = %id, vm = %vm_id, %name, "VM migration incoming");
        let manager = self.clone();
        let expiring = id.clone();
        tokio::spawn(async move {
            tokio::time::sleep(INCOMING_DEADLINE).await;
            if manager.abort_incoming(&expiring).await.is_ok() {
                tracing::warn!(incoming = %expiring, "an incoming migration expired and was deleted");
            }
        });
        Ok(id)
    }

    /// A connection to channel `which` of incoming migration `id`.
    pub async fn incoming_channel(&self, id: &str, which: Channel) -> Result<tokio::net::UnixStream, ApiError> {
        let path = {
            let pending = self.incoming.pending.lock().expect("incoming lock");
            let entry = pending
                .get(id)
                .ok_or_else(|| ApiError::NotFound(format!("no incoming migration '{id}'")))?;
            entry.live.machine.run_socket(match which {
                Channel::Ram => viv_vmm::machine::MIGRATE_SOCKET,
                Channel::Nbd => viv_vmm::machine::NBD_SOCKET,
            })
        };
        tokio::net::UnixStream::connect(&path)
            .await
            .map_err(|e| ApiError::Internal(format!("connecting to the incoming VM's QEMU: {e}")))
    }

    /// Waits for incoming migration `id`'s stream to complete and lets the VM run; on failure
    /// the VM is deleted. 409, changing nothing, while no stream has arrived.
    pub async fn finish_incoming(self: &Arc<Self>, id: &str) -> Result<VmInfo, ApiError> {
        let machine = {
            let pending = self.incoming.pending.lock().expect("incoming lock");
            let entry = pending
                .get(id)
                .ok_or_else(|| ApiError::NotFound(format!("no incoming migration '{id}'")))?;
            entry.live.machine.clone()
        };
        if !machine
            .stream_arrived()
            .await
            .map_err(|e| ApiError::Internal(format!("asking the incoming VM's QEMU: {e}")))?
        {
            return Err(ApiError::Conflict(format!(
                "incoming migration '{id}': no migration stream has arrived yet"
            )));
        }
        let pending = self.incoming.take(id)?;
        let live = pending.live.clone();
        let ran = async {
            live.machine
                .finish_receiving(FINISH_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            live.machine.resume().await.map_err(|e| e.to_string())
        }
        .await;
        if let Err(err) = ran {
            let _ = live.machine.kill().await;
            live.console.close();
            self.remove_pending(&pending).await;
            return Err(ApiError::Internal(format!(
                "VM '{}' did not continue from the migration stream: {err}",
                pending.name
            )));
        }
        let row = self.vm_row(&pending.vm_id)?;
        match &pending.takeover_from {
            Some(from) => {
                if !self.store.take_over_vm(&row.id, from, live.machine.identity())? {
                    let _ = live.machine.kill().await;
                    live.console.close();
                    self.remove_pending(&pending).await;
                    return Err(ApiError::Conflict(format!(
                        "VM '{}' no longer belongs to node {from}: this copy was deleted",
                        pending.name
                    )));
                }
            }
            None => {
                let def = definition_of(&row.definition)?;
                self.store.set_vm_started(
                    &row.id,
                    &to_json(&def)?,
                    VmState::Running.as_str(),
                    live.machine.identity(),
                )?;
            }
        }
        self.vm_runtime.insert(live.clone());
        self.publish_vm(
            &row.id,
            &row.name,
            VmState::Starting,
            VmState::Running,
            Some(match &pending.takeover_from {
                Some(_) => "moved here from another node".into(),
                None => "migrated in from another server".into(),
            }),
        );
        self.supervise_vm(live);
        tracing::info!(incoming = %id, vm = %row.id, "VM migration finished");
        self.vm_info(&row.id)
    }

    /// Aborts incoming migration `id`: its QEMU killed, the VM and its new disks deleted.
    pub async fn abort_incoming(&self, id: &str) -> Result<(), ApiError> {
        let pending = self.incoming.take(id)?;
        let _ = pending.live.machine.kill().await;
        pending.live.console.close();
        self.remove_pending(&pending).await;
        tracing::info!(incoming = %id, vm = %pending.vm_id, "incoming VM migration aborted");
        Ok(())
    }

    /// Aborts every incoming migration (server shutdown).
    pub(super) async fn abort_all_incoming(&self) {
        let ids: Vec<String> = self
            .incoming
            .pending
            .lock()
            .expect("incoming lock")
            .keys()
            .cloned()
            .collect();
        for id in ids {
            let _ = self.abort_incoming(&id).await;
        }
    }

    /// Deletes what an incoming VM that never ran here left: its row (unless it was another
    /// node's, to take over), files and the disks made for it.
    async fn remove_pending(&self, pending: &Pending) {
        match pending.takeover_from {
            Some(_) => self.remove_vm_files(&pending.vm_id, &pending.disks).await,
            None => self.remove_incoming_vm(&pending.vm_id, &pending.disks).await,
        }
    }

    /// Deletes an incoming VM that never ran here: its row, files and the disks made for it.
    async fn remove_incoming_vm(&self, vm_id: &str, disks: &[String]) {
        if let Ok(row) = self.vm_row(vm_id) {
            let _ = self
                .store
                .set_vm_exited(&row.id, VmState::Stopped.as_str(), "migration aborted");
            if let Ok(row) = self.vm_row(vm_id) {
                if let Err(err) = self.delete_vm_row(&row) {
                    tracing::warn!(vm = %vm_id, error = %err, "deleting an aborted incoming VM");
                }
            }
        }
        self.remove_vm_files(vm_id, disks).await;
    }

    /// Deletes VM `vm_id`'s files on this node and its pool disks `disks`: an incoming VM that
    /// never ran here, or a VM that moved to another node.
    pub(super) async fn remove_vm_files(&self, vm_id: &str, disks: &[String]) {
        let _ = std::fs::remove_dir_all(self.vm_dir(vm_id));
        let _ = std::fs::remove_dir_all(self.vm_run_dir(vm_id));
        self.delete_disks(disks).await;
    }

    async fn delete_disks(&self, disks: &[String]) {
        for disk in disks.iter().rev() {
            if let Err(err) = self.storage.delete_disk(disk, viv_storage::unused).await {
                tracing::warn!(disk = %disk, error = %err, "keeping a disk this node no longer needs: it could not be deleted");
            }
        }
    }
}
