//! Sandbox networking as the server's mode has it: the isolated network's start, each VM's
//! card and slot, egress rules checked against what the mode can enforce, and rule changes of
//! running and paused sandboxes.
//!
//! Invariants: a restored node always meets the network mode it was saved under (the card is
//! part of its device state); rules a mode cannot enforce are refused, never silently dropped.

use super::*;

impl Manager {
    /// Sets up isolated networking when the server runs in that mode (removing namespaces and
    /// links a crashed server left, but the slots in `keep`, whose VMs still run).
    pub(super) async fn start_network(&self, keep: std::collections::BTreeSet<u32>) -> Result<(), viv_net::NetError> {
        if self.config.network == NetworkMode::Isolated && self.net.get().is_none() {
            let net = viv_net::Network::start(
                viv_net::NetworkConfig {
                    pool: self.config.net_pool,
                    key: self.data_key[..6].to_owned(),
                    spares: self.config.net_spares,
                },
                keep,
            )
            .await?;
            let _ = self.net.set(net);
        }
        Ok(())
    }

    /// How sandboxes are networked.
    pub fn network_mode(&self) -> NetworkMode {
        self.config.network
    }

    /// Network slots (namespaces) in use, in the isolated mode.
    pub fn network_slots(&self) -> usize {
        self.net.get().map_or(0, viv_net::Network::slots_in_use)
    }

    /// The network card of a VM with egress `rules`, as the server's network mode has it, and
    /// in the isolated mode the slot its QEMU runs in.
    pub(super) async fn network(
        &self,
        rules: &viv_net::PolicySpec,
    ) -> Result<(Option<viv_vmm::Network>, Option<viv_net::Slot>), ApiError> {
        match self.config.network {
            NetworkMode::None => Ok((None, None)),
            NetworkMode::User => Ok((
                Some(viv_vmm::Network::User {
                    internet: rules.internet,
                }),
                None,
            )),
            NetworkMode::Isolated => {
                let net = self
                    .net
                    .get()
                    .ok_or_else(|| ApiError::Unavailable("isolated networking is not set up".into()))?;
                let policy = checked_policy(rules)?;
                let slot = net.acquire(policy).await.map_err(|e| match e {
                    viv_net::NetError::Exhausted(_) => ApiError::NoRoom(e.to_string()),
                    other => ApiError::Internal(format!("setting up the sandbox's network: {other}")),
                })?;
                let card = viv_vmm::Network::Tap {
                    netns: slot.netns_path(),
                    ifname: viv_net::rules::TAP.to_owned(),
                };
                Ok((Some(card), Some(slot)))
            }
        }
    }

    /// Refuses to restore a node saved under another network mode (the card and its backend are
    /// part of the saved state), which QEMU would reject with a message about device state.
    pub(super) fn check_device_set(&self, node: &SnapshotRow) -> Result<(), ApiError> {
        let current = self.config.network.to_string();
        match &node.network {
            Some(saved) if *saved != current => Err(ApiError::Conflict(format!(
                "snapshot {} was saved by a server running `--network {saved}`, but this one runs `--network {current}`; restart it with `--network {saved}` to start from this snapshot",
                node.id
            ))),
            _ => Ok(()),
        }
    }

    /// Egress rules from a request's `allow_internet_access` and `network`, checked against what
    /// this server's network mode can enforce.
    pub(super) fn egress_rules(
        &self,
        internet: Option<bool>,
        allow_out: Option<&Vec<String>>,
        deny_out: Option<&Vec<String>>,
        dns_servers: Option<&Vec<String>>,
        unsupported: [(&str, Option<&serde_json::Value>); 2],
    ) -> Result<viv_net::PolicySpec, ApiError> {
        for (field, value) in unsupported {
            let set = match value {
                None | Some(serde_json::Value::Null) => false,
                Some(serde_json::Value::Object(map)) => !map.is_empty(),
                Some(_) => true,
            };
            if set {
                return Err(ApiError::BadRequest(format!(
                    "network.{field} is not supported by Vivarium"
                )));
            }
        }
        let rules = viv_net::PolicySpec {
            internet: internet.unwrap_or(true),
            allow_out: allow_out.cloned().unwrap_or_default(),
            deny_out: deny_out.cloned().unwrap_or_default(),
            dns_servers: dns_servers.cloned(),
        };
        checked_policy(&rules)?;
        if rules.has_rules() && self.config.network != NetworkMode::Isolated {
            return Err(ApiError::BadRequest(format!(
                "allowOut and denyOut need the isolated network mode; this server runs `--network {}`, which can only turn a sandbox's internet access on or off",
                self.config.network
            )));
        }
        Ok(rules)
    }

    /// Replaces the egress rules of a sandbox (`PUT /sandboxes/{id}/network`): at once for a
    /// running sandbox in the isolated mode, at resume for a paused one.
    pub async fn update_network(&self, id: &str, update: viv_api::NetworkUpdate) -> Result<(), ApiError> {
        let rules = self.egress_rules(
            update.allow_internet_access,
            update.allow_out.as_ref(),
            update.deny_out.as_ref(),
            update.dns_servers.as_ref(),
            [
                ("egressProxy", update.egress_proxy.as_ref()),
                ("rules", update.rules.as_ref()),
            ],
        )?;
        let row = self.store.sandbox(id)?.ok_or_else(|| ApiError::sandbox_not_found(id))?;
        match row.state {
            SandboxState::Paused => {}
            SandboxState::Running => {
                let live = self.live(id)?;
                let _op = live.op.lock().await;
                match live.slot() {
                    Some(slot) => slot
                        .apply(checked_policy(&rules)?)
                        .await
                        .map_err(|e| ApiError::Internal(format!("changing the sandbox's rules: {e}")))?,
                    None if rules.internet != row.network.internet && self.config.network == NetworkMode::User => {
                        return Err(ApiError::Conflict(
                            "a running sandbox's internet access can only change in the isolated network mode (pause and resume it to apply the change)".into(),
                        ));
                    }
                    None => {}
                }
            }
            state => {
                return Err(ApiError::Conflict(format!(
                    "sandbox {id} is {}; only running and paused sandboxes have a network",
                    state.as_str()
                )))
            }
        }
        self.store.put_sandbox(&SandboxRow { network: rules, ..row })?;
        Ok(())
    }
}
