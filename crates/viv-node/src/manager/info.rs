//! What clients see of a sandbox: its info (`GET /sandboxes/{id}`, lists) and its create
//! answer, built from its store row.
//!
//! Invariants: a failed sandbox is gone for clients (404 with its reason); nothing here
//! changes state.

use super::*;

impl Manager {
    /// What clients see of `row`; `client_id` is the name of the node holding it.
    pub(super) fn info(&self, row: SandboxRow, client_id: String) -> SandboxInfo {
        let (lifecycle, pause_mode) = self.lifecycle_view(&row);
        SandboxInfo {
            lifecycle: Some(lifecycle),
            pause_mode,
            sandbox_id: row.id,
            template_id: row.template_id,
            client_id,
            started_at: row.started_at,
            end_at: rfc3339_ms(row.end_at_ms),
            cpu_count: row.cpu_count,
            memory_mb: row.memory_mb,
            disk_size_mb: viv_image::rootfs::DebianRecipe::default().size_mib,
            metadata: row.metadata,
            state: row.state,
            envd_version: viv_proto::ENVD_VERSION.to_owned(),
            error: row.error,
            allow_internet_access: row.network.internet,
            network: (!row.network.is_plain()).then(|| viv_api::NetworkConfig {
                allow_out: Some(row.network.allow_out.clone()),
                deny_out: Some(row.network.deny_out.clone()),
                dns_servers: row.network.dns_servers.clone(),
                ..viv_api::NetworkConfig::default()
            }),
            domain: Some(self.config.domain.clone()),
        }
    }

    /// One sandbox. A sandbox whose VM died is gone, as E2B has it (404), and the message says
    /// why.
    pub fn get(&self, id: &str) -> Result<SandboxInfo, ApiError> {
        let row = self.store.sandbox(id)?.ok_or_else(|| ApiError::sandbox_not_found(id))?;
        if row.state == SandboxState::Failed {
            return Err(ApiError::NotFound(format!(
                "sandbox '{id}' is gone: {}",
                row.error.as_deref().unwrap_or("its VM stopped")
            )));
        }
        let client_id = self
            .store
            .sandbox_node_name(id)?
            .unwrap_or_else(|| self.config.node_name.clone());
        Ok(self.info(row, client_id))
    }

    /// All sandboxes (failed ones too: callers filter by state), optionally only those whose
    /// metadata contains every pair in `filter`.
    /// Each one's `clientID` is the name of its node (in a cluster, any node's).
    pub fn list(&self, filter: &BTreeMap<String, String>) -> Result<Vec<SandboxInfo>, ApiError> {
        let mut nodes = self.store.sandbox_node_names()?;
        Ok(self
            .store
            .sandboxes()?
            .into_iter()
            .filter(|row| filter.iter().all(|(k, v)| row.metadata.get(k) == Some(v)))
            .map(|row| {
                let client_id = nodes.remove(&row.id).unwrap_or_else(|| self.config.node_name.clone());
                self.info(row, client_id)
            })
            .collect())
    }

    /// The create response for a sandbox row.
    pub(super) fn created(&self, row: &SandboxRow) -> CreatedSandbox {
        CreatedSandbox {
            sandbox_id: row.id.clone(),
            template_id: row.template_id.clone(),
            client_id: self.config.node_name.clone(),
            envd_version: viv_proto::ENVD_VERSION.to_owned(),
            envd_access_token: row.access_token.clone(),
            domain: Some(self.config.domain.clone()),
            traffic_access_token: self.store.traffic_token(&row.id).ok().flatten(),
        }
    }
}
