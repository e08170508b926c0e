//! The bridge between sandboxes and VMs: a VM made from a sandbox snapshot or template, and the
//! sandbox agent inside it that `POST /vms/{id}/exec` talks to.
//!
//! A VM from a sandbox gets the snapshot's (or template's) root file system as a standalone
//! qcow2 disk of its own in the storage pool (the layer chain flattened, so the VM depends on no
//! snapshot node or template and they may be deleted), and the definition flag `sandboxKernel`:
//! the machine is a `microvm` that boots the server's sandbox kernel and initramfs directly
//! with that disk as `/dev/vda`, as a sandbox cold boot does, and has the agent's virtio-serial
//! port. A sandbox snapshot's memory is not restored: a sandbox's saved devices are those of
//! the sandbox machine, not of a VM, so the VM boots the disk afresh (a `disk-only` start).
//!
//! The agent is reached through the same channel and client as a sandbox's
//! ([`crate::agent_client::AgentClient`] on the machine's `agent.sock`): the VM is not a sandbox
//! (no lifetime, no E2B routes, no snapshot node of its own), so rather than registering it as
//! one, the VM routes gain an `exec` that relays the agent's process stream as the sandbox
//! route does.
//!
//! Invariants:
//! - a VM's agent is initialized once per QEMU process, on first use, under a lock: the first
//!   exec waits for the guest to boot; the agent gets the server's channel key (as sandboxes'
//!   agents do) and no access token (only the server reaches the port);
//! - after a server restart the agent of a taken-over VM may have been initialized already, and
//!   a fork's agent continues its source's: the server's key is tried first, and an agent that
//!   does not answer to it is initialized afresh.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use viv_api::vms::{BootDevice, DiskBus, Firmware, MachineType, NewVm, VmDisk, VmInfo, VmTemplate, VmTemplateInfo};

use super::vm_runtime::LiveVm;
use super::Manager;
use crate::agent_client::AgentClient;
use crate::error::ApiError;

/// How long an agent that a previous server initialized gets to answer with the server's key.
const ADOPTED_PROBE: Duration = Duration::from_secs(5);

/// The sandbox agent of a running VM.
pub struct VmAgent {
    /// The channel's client.
    pub client: AgentClient,
    /// Whether the agent was initialized (by this server, or found to answer its key).
    ready: tokio::sync::Mutex<bool>,
    /// The VM was taken over from a previous server, or continues a saved state (a fork).
    adopted: bool,
}

impl VmAgent {
    pub(super) fn new(socket: PathBuf, adopted: bool) -> Self {
        Self {
            client: AgentClient::new(socket),
            ready: tokio::sync::Mutex::new(false),
            adopted,
        }
    }
}

impl Manager {
    /// The running VM `id_or_name` and its agent, initialized (waiting for the guest to boot,
    /// at most the boot timeout). 404 for no such VM; 409 when it is not running or has no agent.
    pub async fn vm_agent(&self, id_or_name: &str) -> Result<(Arc<LiveVm>, Arc<VmAgent>), ApiError> {
        let row = self.vm_row(id_or_name)?;
        let state = super::vms::state_of(&row)?;
        if state != viv_api::vms::VmState::Running {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is {}: exec needs it running (viv vm start {})",
                row.name,
                state.as_str(),
                row.name
            )));
        }
        let live = self.live_of(&row)?;
        let agent = live.agent.clone().ok_or_else(|| {
            ApiError::Conflict(format!(
                "VM '{}' does not run the sandbox agent: only VMs made from a sandbox snapshot or template (sandboxKernel) answer exec",
                row.name
            ))
        })?;
        let mut ready = agent.ready.lock().await;
        if !*ready {
            self.init_vm_agent(&live, &agent, &row.name).await?;
            *ready = true;
        }
        drop(ready);
        Ok((live, agent))
    }

    async fn init_vm_agent(&self, live: &LiveVm, agent: &VmAgent, name: &str) -> Result<(), ApiError> {
        let client = &agent.client;
        if agent.adopted {
            client.set_channel_key(self.channel_key.clone());
            if client.wait_ready(ADOPTED_PROBE).await.is_ok() {
                return Ok(());
            }
            client.close().await;
        }
        client.set_channel_key(String::new());
        let limit = self.config.boot_timeout;
        let mut exit = live.machine.exit();
        let booted = tokio::select! {
            ready = client.wait_ready(limit) => ready.map_err(|e| e.to_string()),
            _ = exit.wait_for(Option::is_some) => Err("the VM stopped while booting".to_owned()),
        };
        booted.map_err(|reason| {
            ApiError::Unavailable(format!(
                "the agent of VM '{name}' did not answer within {limit:?}: {reason} (see its console: viv console {name})"
            ))
        })?;
        let body = serde_json::json!({
            "timestampMs": super::now_ms(),
            "accessToken": "",
            "hostname": name,
            "channelKey": self.channel_key,
            "caCertificates": self.config.guest_ca_certificates,
        });
        client
            .call::<_, serde_json::Value>("/init", &body)
            .await
            .map_err(|e| ApiError::Internal(format!("initializing the agent of VM '{name}': {e}")))?;
        client.set_channel_key(self.channel_key.clone());
        Ok(())
    }

    /// Defines a VM whose first disk is a copy of a sandbox snapshot's or template's root file
    /// system, booted with the sandbox kernel and agent.
    pub async fn create_vm_from_sandbox(&self, req: NewVm) -> Result<VmInfo, ApiError> {
        super::check_name("VM", &req.name)?;
        if self.store.vm(&req.name)?.is_some() {
            return Err(ApiError::Conflict(format!("a VM named '{}' already exists", req.name)));
        }
        let (layer, origin) = match (&req.from_snapshot, &req.from_template) {
            (Some(_), Some(_)) => {
                return Err(ApiError::BadRequest(
                    "give fromSnapshot or fromTemplate, not both".into(),
                ))
            }
            (Some(snapshot), None) => {
                let node = self.store.snapshot(snapshot)?.ok_or_else(|| {
                    ApiError::NotFound(format!("no sandbox snapshot '{snapshot}' (see viv snapshot list)"))
                })?;
                (
                    self.node_dir(&node.id).join("disk.qcow2"),
                    format!("snapshot:{}", node.id),
                )
            }
            (None, Some(template)) => {
                let name = super::builtin::canonical_template_name(template);
                (self.recipe(name)?.layer, format!("template:{name}"))
            }
            (None, None) => return Err(ApiError::BadRequest("no sandbox snapshot or template given".into())),
        };
        if !layer.is_file() {
            return Err(ApiError::Conflict(format!(
                "the root file system {} is not there (was it deleted meanwhile?)",
                layer.display()
            )));
        }
        let disk = format!("{}-root", req.name);
        if viv_storage::name::check(&disk).is_err() {
            return Err(ApiError::BadRequest(format!(
                "the VM's root disk is named '{disk}', which is not a valid disk name (at most 64 characters): choose a shorter VM name"
            )));
        }
        let mut def = req.definition;
        def.machine = MachineType::Microvm;
        def.firmware = Firmware::Bios;
        def.sandbox_kernel = true;
        def.boot_order = vec![BootDevice::Disk];
        def.disks.insert(
            0,
            VmDisk {
                disk: disk.clone(),
                bus: DiskBus::VirtioBlk,
                read_only: false,
                shareable: false,
            },
        );
        self.fill_macs(&mut def)?;
        // Checked before the copy, so a bad definition costs nothing.
        super::vms::check_definition(&def, &self.store.list_vms()?, None).or_else(|e| match e {
            // The root disk does not exist yet.
            ApiError::NotFound(_) => Ok(()),
            other => Err(other),
        })?;
        let started = std::time::Instant::now();
        self.storage
            .import_own_image(&disk, &layer, &mut |_| {})
            .await
            .map_err(|e| {
                super::storage::api(
                    e.kind(),
                    format!("copying the root file system into disk '{disk}': {e}"),
                )
            })?;
        let created = self.create_vm(NewVm::new(req.name.clone(), def)).and_then(|info| {
            self.store.set_vm_origin(&info.id, &origin)?;
            Ok(info)
        });
        match &created {
            Ok(info) => tracing::info!(
                vm = %info.id,
                layer = %layer.display(),
                ms = started.elapsed().as_millis() as u64,
                "VM made from a sandbox's root file system"
            ),
            Err(_) => {
                let _ = self.storage.delete_disk(&disk, viv_storage::unused).await;
            }
        }
        created
    }

    /// Makes a sandbox template of stopped VM `vm`'s root file system: the first disk,
    /// flattened into a layer of its own, which sandboxes boot (and snapshot at first use) as
    /// they do any template. Only VMs that boot the sandbox kernel have a disk sandboxes can
    /// boot (an ext4 root file system with the agent on `/dev/vda`); others are refused.
    pub async fn template_from_vm(&self, vm: &str, req: VmTemplate) -> Result<VmTemplateInfo, ApiError> {
        if !super::builds::valid_template_name(&req.name) {
            return Err(ApiError::BadRequest(format!(
                "template name '{}' must be 1 to 63 of a-z, 0-9, '-' and '_', starting with a letter or digit",
                req.name
            )));
        }
        let (row, _held) = self.lock_vm(vm).await?;
        let state = super::vms::state_of(&row)?;
        if state.is_active() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is {}: stop it first (its disk must not change while it is copied)",
                row.name,
                state.as_str()
            )));
        }
        let def = super::vms::definition_of(&row.definition)?;
        if !def.sandbox_kernel {
            return Err(ApiError::Conflict(format!(
                "VM '{}' does not boot the sandbox kernel: a sandbox template needs an ext4 root file system with the sandbox agent as the first disk, which only VMs made from a sandbox snapshot or template (sandboxKernel) are known to have",
                row.name
            )));
        }
        if self.store.template(&req.name)?.is_some()
            || super::builtin::builtin_named(&req.name).is_some()
            || req.name == viv_api::DEFAULT_TEMPLATE
        {
            return Err(ApiError::Conflict(format!(
                "a template named '{}' exists already",
                req.name
            )));
        }
        let disk = &def.disks[0].disk;
        let info = self
            .storage
            .disk_info(disk)
            .await
            .map_err(|e| super::storage::api(e.kind(), format!("disk '{disk}' of VM '{}': {e}", row.name)))?;
        let started = std::time::Instant::now();
        let key = format!("vm-{}", super::random_id(20));
        let layers = self.config.data_dir.join("layers");
        let layer = layers.join(format!("{key}.qcow2"));
        let partial = layers.join(format!(".{key}.partial"));
        let copied = async {
            std::fs::create_dir_all(&layers).map_err(|e| e.to_string())?;
            viv_storage::qemu_img::convert(&info.path, info.format.as_str(), &partial, "qcow2", &mut |_| {})
                .await
                .map_err(|e| e.to_string())?;
            std::fs::rename(&partial, &layer).map_err(|e| e.to_string())
        }
        .await;
        if let Err(err) = copied {
            let _ = std::fs::remove_file(&partial);
            return Err(ApiError::Internal(format!("copying disk '{disk}' into a layer: {err}")));
        }
        super::snapshots::seal(&layer)?;
        let bytes = std::fs::metadata(&layer).map(|m| m.len()).unwrap_or(0);
        let template = crate::store::TemplateRow {
            name: req.name.clone(),
            from: format!("vm:{}", row.name),
            layer: layer.to_string_lossy().into_owned(),
            config: Default::default(),
            start: None,
            ready: None,
            cpu_count: def.cpu.vcpus(),
            memory_mb: def.memory_mib,
            spec: format!("# the root file system of VM '{}' ({})\n", row.name, row.id),
            layers: vec![key],
            created_at: crate::store::now_rfc3339(),
            build_ms: started.elapsed().as_millis() as u64,
        };
        if let Err(err) = self.store.put_template(&template) {
            let _ = std::fs::remove_file(&layer);
            return Err(err.into());
        }
        tracing::info!(vm = %row.id, template = %req.name, bytes, ms = template.build_ms, "template made from a VM");
        Ok(VmTemplateInfo {
            name: req.name,
            vm_id: row.id,
            bytes,
        })
    }
}
