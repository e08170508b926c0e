//! What this node reports in its heartbeats (capacity, what it runs, which templates it
//! holds) and what it does when another server reported its sandboxes lost.
//!
//! Invariant: the figures describe this node's data directory and this node's rows only
//! (`Store::local_sandboxes`, `Store::local_vms`); rows of other nodes never count here.

use viv_api::nodes::NodeCapacity;
use viv_api::vms::VmState;
use viv_api::SandboxState;

use super::Manager;
use crate::error::ApiError;

impl Manager {
    /// This node's capacity and use now (none for an API server: nothing is placed on it).
    pub fn node_capacity(&self) -> Result<NodeCapacity, ApiError> {
        if !self.config.role.runs_vms() {
            return Ok(NodeCapacity {
                disk_free_mib: super::storage::free_bytes(&self.config.data_dir).unwrap_or(0) >> 20,
                network: "none".into(),
                ..NodeCapacity::default()
            });
        }
        let host = crate::capacity::HostLimits::host();
        let mut capacity = NodeCapacity {
            vcpus: host.max_vcpus,
            memory_mib: u64::from(host.max_memory_mib),
            disk_free_mib: super::storage::free_bytes(&self.config.data_dir).unwrap_or(0) >> 20,
            accel: self.accel().to_string(),
            network: self.network_mode().to_string(),
            ..NodeCapacity::default()
        };
        for row in self.store.local_sandboxes()? {
            if matches!(row.state, SandboxState::Running | SandboxState::Starting) {
                capacity.vcpus_used += row.cpu_count;
                capacity.memory_used_mib += u64::from(row.memory_mb);
            }
        }
        for row in self.store.local_vms()? {
            if !row.state.parse::<VmState>().is_ok_and(VmState::is_active) {
                continue;
            }
            if let Ok(def) = super::vms::definition_of(&row.definition) {
                capacity.vcpus_used += def.cpu.vcpus();
                capacity.memory_used_mib += u64::from(def.memory_mib);
            }
        }
        capacity.templates = self
            .store
            .templates()?
            .into_iter()
            .filter(|t| self.local_layer(&t.layer).is_file())
            .map(|t| t.name)
            .collect();
        Ok(capacity)
    }

    /// Stops the VMs of sandboxes another server reported lost while this node was marked
    /// down (their rows say `failed`; their clients were told they are gone). Returns their
    /// ids.
    pub async fn stop_sandboxes_reported_lost(&self) -> Vec<String> {
        let live: Vec<String> = self.live.lock().expect("live lock").keys().cloned().collect();
        let mut stopped = Vec::new();
        for id in live {
            let lost = matches!(self.store.sandbox(&id), Ok(Some(row)) if row.state == SandboxState::Failed);
            if lost {
                tracing::warn!(sandbox = %id, "stopping a sandbox reported lost while this node was down");
                let _ = self.kill(&id).await;
                stopped.push(id);
            }
        }
        stopped
    }
}

impl Manager {
    /// The vCPUs and MiB a create that names `template` (or none) and no shape gets, as far as
    /// placement needs it: the template's own shape, else this server's default.
    pub fn default_shape(&self, template: Option<&str>) -> (u32, u32) {
        let template = template.unwrap_or(viv_api::DEFAULT_TEMPLATE);
        match self.store.template(template) {
            Ok(Some(row)) => (row.cpu_count, row.memory_mb),
            _ => (self.config.vcpus, self.config.memory_mib),
        }
    }
}
