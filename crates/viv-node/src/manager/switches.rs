//! VM switches: create, list, get, edit and delete them (rows in the store, bridges, dnsmasqs
//! and rules on the host through [`viv_net::switches`]), bring them back at server start, and
//! the tap devices that put VM NICs on them.
//!
//! Invariants:
//! - the store is the truth: at start every switch of the store is created or taken back on
//!   the host (bridges of VMs that outlived the server keep their taps) and everything of this
//!   server's key the store does not know is removed (a crashed server's leftovers);
//! - host changes of switches are serialized ([`Switches::host`]) and the rules table is
//!   always rebuilt from the whole store;
//! - a switch is deleted only when no VM definition (current or pending) names it, checked and
//!   deleted under [`Switches::names`], which VM creates and edits take to check the switches
//!   they name;
//! - subnets of switches never overlap each other, the sandbox pool or a network the host
//!   routes elsewhere (checked when given or allocated).

use viv_api::switches::{NewSwitch, SwitchDefinition, SwitchInfo, SwitchKind};
use viv_net::switches::{Bridge, Forwarding, SwitchHost};
use viv_net::Cidr;

use super::vms::definition_of;
use super::Manager;
use crate::error::ApiError;
use crate::store::SwitchRow;

/// The locks of the switches.
#[derive(Default)]
pub(super) struct Switches {
    /// Held across host changes (bridges, dnsmasqs, the table).
    host: tokio::sync::Mutex<()>,
    /// Held while a switch's existence is checked and acted on (create, delete; VM definitions
    /// naming switches).
    pub(super) names: std::sync::Mutex<()>,
}

/// Blocks no switch may use: they mean something else to every host.
const RESERVED: [(&str, &str); 4] = [
    ("0.0.0.0/8", "this network"),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/3", "multicast and reserved"),
];

/// The prefix lengths a switch's subnet may have.
const PREFIXES: std::ops::RangeInclusive<u8> = 16..=29;

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

fn definition(row: &SwitchRow) -> Result<SwitchDefinition, ApiError> {
    serde_json::from_str(&row.definition).map_err(|e| ApiError::Internal(format!("switch '{}': {e}", row.name)))
}

/// A bridged switch's uplink.
fn uplink_of(def: &SwitchDefinition) -> Option<&str> {
    (def.kind == SwitchKind::Bridged)
        .then_some(def.uplink.as_deref())
        .flatten()
}

/// Whether `def` is bridged, checking that `uplink` and `subnet` go with its kind (400 else).
fn check_uplink(def: &SwitchDefinition) -> Result<bool, ApiError> {
    match (def.kind == SwitchKind::Bridged, &def.uplink) {
        (true, None) => Err(ApiError::BadRequest(
            "a bridged switch needs an uplink: the name of a Linux bridge on the host".into(),
        )),
        (true, Some(uplink)) => {
            if uplink.is_empty()
                || uplink.len() > 15
                || !uplink.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err(ApiError::BadRequest(format!(
                    "uplink {uplink:?} is no interface name (1 to 15 letters, digits, '.', '_' or '-')"
                )));
            }
            if def.subnet.is_some() {
                return Err(ApiError::BadRequest(
                    "a bridged switch has no subnet of ours: its network is the uplink's".into(),
                ));
            }
            Ok(true)
        }
        (false, Some(_)) => Err(ApiError::BadRequest(format!(
            "only a bridged switch has an uplink, not a {} one",
            def.kind.as_str()
        ))),
        (false, None) => Ok(false),
    }
}

/// The subnet of `def` (host bits cleared).
fn subnet_of(def: &SwitchDefinition) -> Result<Cidr, ApiError> {
    let text = def.subnet.as_deref().unwrap_or_default();
    let cidr: Cidr = text
        .parse()
        .map_err(|e| ApiError::BadRequest(format!("invalid subnet {text:?}: {e}")))?;
    if !PREFIXES.contains(&cidr.prefix) {
        return Err(ApiError::BadRequest(format!(
            "subnet {text}: the prefix length must be between {} and {}",
            PREFIXES.start(),
            PREFIXES.end()
        )));
    }
    Ok(cidr)
}

impl Manager {
    fn switch_host(&self) -> SwitchHost {
        SwitchHost::new(&self.data_key[..6])
    }

    fn bridge_of(&self, row: &SwitchRow) -> Result<Bridge, ApiError> {
        let def = definition(row)?;
        Ok(Bridge {
            name: self.switch_host().bridge_name(row.index),
            subnet: subnet_of(&def)?,
            forwarding: match def.kind {
                SwitchKind::Nat => Forwarding::Nat,
                SwitchKind::Isolated => Forwarding::None,
                SwitchKind::Routed => Forwarding::Routed,
                // Never asked: a bridged switch has no bridge of ours (see `our_switches`).
                SwitchKind::Bridged => Forwarding::None,
            },
            port_isolation: def.port_isolation,
        })
    }

    /// VM names whose definition (current or pending) has a NIC on switch `name`.
    fn vms_on_switch(&self, name: &str) -> Result<Vec<String>, ApiError> {
        let mut names = Vec::new();
        for row in self.store.list_vms()? {
            let defs = std::iter::once(Some(&row.definition))
                .chain(std::iter::once(row.pending_definition.as_ref()))
                .flatten();
            for def in defs {
                let Ok(def) = definition_of(def) else { continue };
                if def.nics.iter().any(|n| n.switch.as_deref() == Some(name)) && !names.contains(&row.name) {
                    names.push(row.name.clone());
                }
            }
        }
        Ok(names)
    }

    fn switch_info(&self, row: &SwitchRow) -> Result<SwitchInfo, ApiError> {
        let def = definition(row)?;
        let (bridge, subnet, host_address) = match uplink_of(&def) {
            Some(uplink) => (uplink.to_owned(), None, None),
            None => {
                let bridge = self.bridge_of(row)?;
                let host = bridge.host_address().to_string();
                (bridge.name, Some(bridge.subnet.to_string()), Some(host))
            }
        };
        Ok(SwitchInfo {
            name: row.name.clone(),
            kind: def.kind,
            subnet,
            host_address,
            port_isolation: def.port_isolation,
            bridge,
            vms: self.vms_on_switch(&row.name)?,
            created_at: row.created_at.clone(),
        })
    }

    fn switch_row(&self, name: &str) -> Result<SwitchRow, ApiError> {
        self.store
            .switch(name)?
            .ok_or_else(|| ApiError::NotFound(format!("no switch '{name}'")))
    }

    /// Checks that `subnet` overlaps no other switch's (but `this`'s) and not the sandbox pool.
    fn check_subnet(&self, subnet: Cidr, this: Option<&str>) -> Result<(), ApiError> {
        for (reserved, what) in RESERVED {
            let reserved: Cidr = reserved.parse().map_err(internal)?;
            if reserved.overlaps(&subnet) {
                return Err(ApiError::Conflict(format!(
                    "subnet {subnet} overlaps {reserved} ({what}), which no switch may use"
                )));
            }
        }
        if subnet.overlaps(&self.config.net_pool) {
            return Err(ApiError::Conflict(format!(
                "subnet {subnet} overlaps the sandbox address pool {} (--net-pool)",
                self.config.net_pool
            )));
        }
        let ours = format!("vs{}", &self.data_key[..6]);
        if let Some((net, dev)) = viv_net::switches::host_routes(&ours)
            .into_iter()
            .find(|(net, _)| net.overlaps(&subnet))
        {
            return Err(ApiError::Conflict(format!(
                "subnet {subnet} overlaps the host's network {net} (on {dev}); choose another"
            )));
        }
        for row in self.our_switches()? {
            if Some(row.name.as_str()) == this {
                continue;
            }
            let theirs = self.bridge_of(&row)?.subnet;
            if theirs.overlaps(&subnet) {
                return Err(ApiError::Conflict(format!(
                    "subnet {subnet} overlaps switch '{}' ({theirs})",
                    row.name
                )));
            }
        }
        Ok(())
    }

    /// The first /24 of the switch range no switch uses.
    fn allocate_subnet(&self) -> Result<Cidr, ApiError> {
        let range = self.config.switch_range;
        let blocks = if range.prefix > 24 {
            0
        } else {
            1u64 << (24 - range.prefix)
        };
        let taken: Vec<Cidr> = self
            .our_switches()?
            .iter()
            .map(|r| self.bridge_of(r).map(|b| b.subnet))
            .collect::<Result<_, _>>()?;
        let routes = viv_net::switches::host_routes(&format!("vs{}", &self.data_key[..6]));
        (0..blocks)
            .map(|i| Cidr::new(range.nth((i * 256) as u32), 24))
            .find(|c| {
                !taken.iter().any(|t| t.overlaps(c))
                    && !c.overlaps(&self.config.net_pool)
                    && !routes.iter().any(|(r, _)| r.overlaps(c))
            })
            .ok_or_else(|| {
                ApiError::NoRoom(format!(
                    "every /24 of the switch range {range} is taken; give a subnet or use a larger --switch-range"
                ))
            })
    }

    /// Creates a switch: its row, then its bridge, dnsmasq and rules.
    pub async fn create_switch(&self, req: NewSwitch) -> Result<SwitchInfo, ApiError> {
        super::check_name("switch", &req.name)?;
        let mut def = req.definition;
        let _host = self.switches.host.lock().await;
        let row = {
            let _names = self.switches.names.lock().expect("switch names lock");
            if check_uplink(&def)? {
                self.check_uplink_bridge(&def)?;
            } else {
                match &def.subnet {
                    Some(_) => {
                        let subnet = subnet_of(&def)?;
                        self.check_subnet(subnet, None)?;
                        def.subnet = Some(subnet.to_string());
                    }
                    None => def.subnet = Some(self.allocate_subnet()?.to_string()),
                }
            }
            let json = serde_json::to_string(&def).map_err(internal)?;
            self.store
                .insert_switch(&req.name, &json)?
                .ok_or_else(|| ApiError::Conflict(format!("a switch named '{}' already exists", req.name)))?
        };
        if let Some(uplink) = uplink_of(&def) {
            tracing::info!(switch = %row.name, %uplink, "bridged switch created");
            return self.switch_info(&row);
        }
        let bridge = self.bridge_of(&row)?;
        if let Err(err) = self.bring_up(&bridge).await {
            let _ = self.store.delete_switch(&row.name);
            let host = self.switch_host();
            let name = bridge.name.clone();
            let _ = tokio::task::spawn_blocking(move || host.remove(&name)).await;
            let _ = self.reload_switch_rules().await;
            return Err(err);
        }
        tracing::info!(switch = %row.name, bridge = %bridge.name, subnet = %bridge.subnet, "switch created");
        self.switch_info(&row)
    }

    /// Creates (or takes back) `bridge` on the host, (re)starts its dnsmasq, reloads the rules.
    async fn bring_up(&self, bridge: &Bridge) -> Result<(), ApiError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(ApiError::Unavailable(
                "switches need root (CAP_NET_ADMIN): run the server as root".into(),
            ));
        }
        let (host, b) = (self.switch_host(), bridge.clone());
        tokio::task::spawn_blocking(move || {
            host.ensure(&b)?;
            host.set_port_isolation(&b)?;
            host.start_dnsmasq(&b)
        })
        .await
        .map_err(internal)?
        .map_err(|e| ApiError::Internal(format!("setting up bridge {}: {e}", bridge.name)))?;
        self.reload_switch_rules().await
    }

    /// Replaces the host's switch table with the rules of every stored switch.
    async fn reload_switch_rules(&self) -> Result<(), ApiError> {
        let bridges: Vec<Bridge> = self
            .our_switches()?
            .iter()
            .map(|r| self.bridge_of(r))
            .collect::<Result<_, _>>()?;
        let host = self.switch_host();
        tokio::task::spawn_blocking(move || host.load_rules(&bridges))
            .await
            .map_err(internal)?
            .map_err(|e| ApiError::Internal(format!("loading the switch rules: {e}")))
    }

    /// Every switch, by name.
    pub fn list_switches(&self) -> Result<Vec<SwitchInfo>, ApiError> {
        self.store
            .list_switches()?
            .iter()
            .map(|r| self.switch_info(r))
            .collect()
    }

    /// A switch by name.
    pub fn get_switch(&self, name: &str) -> Result<SwitchInfo, ApiError> {
        self.switch_info(&self.switch_row(name)?)
    }

    /// Applies a JSON merge patch to a switch's settings, at once (running VMs keep their taps;
    /// their guests see a new subnet at their next DHCP renewal).
    pub async fn edit_switch(&self, name: &str, patch: serde_json::Value) -> Result<SwitchInfo, ApiError> {
        if !patch.is_object() {
            return Err(ApiError::BadRequest("an edit is a JSON object of switch fields".into()));
        }
        let _host = self.switches.host.lock().await;
        let row = self.switch_row(name)?;
        let mut merged = serde_json::to_value(definition(&row)?).map_err(internal)?;
        super::vms::merge_patch(&mut merged, &patch);
        let mut def: SwitchDefinition =
            serde_json::from_value(merged).map_err(|e| ApiError::BadRequest(format!("invalid switch: {e}")))?;
        let before = definition(&row)?;
        let was_bridged = before.kind == SwitchKind::Bridged;
        if (def.kind == SwitchKind::Bridged || def.uplink.is_some()) != was_bridged
            || (was_bridged && def.uplink != before.uplink)
        {
            return Err(ApiError::Conflict(format!(
                "switch '{name}': a switch does not become or stop being bridged, nor change its uplink: create another"
            )));
        }
        let bridged = check_uplink(&def)?;
        if !bridged {
            match &def.subnet {
                Some(_) => {
                    let subnet = subnet_of(&def)?;
                    self.check_subnet(subnet, Some(name))?;
                    def.subnet = Some(subnet.to_string());
                }
                None => def.subnet = Some(self.allocate_subnet()?.to_string()),
            }
        }
        let json = serde_json::to_string(&def).map_err(internal)?;
        if !self.store.update_switch(name, &json)? {
            return Err(ApiError::NotFound(format!("no switch '{name}'")));
        }
        let row = self.switch_row(name)?;
        match uplink_of(&def) {
            // Our taps on it take the new port isolation; the operator's ports keep theirs.
            Some(uplink) => {
                let (host, uplink, isolated) = (self.switch_host(), uplink.to_owned(), def.port_isolation);
                tokio::task::spawn_blocking(move || host.set_tap_isolation(&uplink, isolated))
                    .await
                    .map_err(internal)?
                    .map_err(|e| ApiError::Internal(format!("switch '{name}': {e}")))?;
            }
            None => self.bring_up(&self.bridge_of(&row)?).await?,
        }
        self.switch_info(&row)
    }

    /// Deletes a switch no VM names (409 naming them otherwise), with its bridge and dnsmasq.
    pub async fn delete_switch(&self, name: &str) -> Result<(), ApiError> {
        let _host = self.switches.host.lock().await;
        let bridge = {
            let _names = self.switches.names.lock().expect("switch names lock");
            let row = self.switch_row(name)?;
            let users = self.vms_on_switch(name)?;
            if !users.is_empty() {
                return Err(ApiError::Conflict(format!(
                    "switch '{name}' is used by VM{} {}: remove their NICs from it first",
                    if users.len() == 1 { "" } else { "s" },
                    users.iter().map(|u| format!("'{u}'")).collect::<Vec<_>>().join(", ")
                )));
            }
            // A bridged switch's uplink is the operator's: it stays.
            let bridge = uplink_of(&definition(&row)?)
                .is_none()
                .then(|| self.switch_host().bridge_name(row.index));
            self.store.delete_switch(name)?;
            bridge
        };
        if let Some(bridge) = bridge {
            let host = self.switch_host();
            tokio::task::spawn_blocking(move || host.remove(&bridge))
                .await
                .map_err(internal)?;
        }
        self.reload_switch_rules().await?;
        tracing::info!(switch = %name, "switch deleted");
        Ok(())
    }

    /// At server start: removes this key's bridges and dnsmasqs the store does not know, and
    /// brings up (or takes back) those it does. A switch that cannot be brought up is logged,
    /// and VMs on it fail to start with the reason.
    pub(super) async fn start_switches(&self) -> Result<(), ApiError> {
        for row in self.store.list_switches()? {
            let def = definition(&row)?;
            if let Err(err) = self.check_uplink_bridge(&def) {
                tracing::warn!(switch = %row.name, error = %err, "a bridged switch's uplink is missing");
            }
        }
        let rows = self.our_switches()?;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            if !rows.is_empty() {
                tracing::warn!(switches = rows.len(), "not root: VM switches are not set up");
            }
            return Ok(());
        }
        let bridges: Vec<Bridge> = rows.iter().map(|r| self.bridge_of(r)).collect::<Result<_, _>>()?;
        let known: Vec<String> = bridges.iter().map(|b| b.name.clone()).collect();
        let host = self.switch_host();
        tokio::task::spawn_blocking(move || host.remove_unknown(&known))
            .await
            .map_err(internal)?;
        let _host = self.switches.host.lock().await;
        for bridge in &bridges {
            if let Err(err) = self.bring_up(bridge).await {
                tracing::warn!(bridge = %bridge.name, error = %err, "bringing up a switch failed");
            }
        }
        if bridges.is_empty() {
            self.reload_switch_rules().await?;
        }
        Ok(())
    }

    /// At server shutdown: with no VM left running, every bridge, dnsmasq and the table go (the
    /// next server recreates them from the store); otherwise they stay for the VMs.
    pub(super) async fn stop_switches(&self, vms_left_running: bool) {
        // SAFETY: geteuid has no preconditions.
        if vms_left_running || unsafe { libc::geteuid() } != 0 {
            return;
        }
        let _host = self.switches.host.lock().await;
        let host = self.switch_host();
        let _ = tokio::task::spawn_blocking(move || host.remove_all()).await;
    }

    /// Checks that every switch `def`'s NICs name exists (the caller holds
    /// [`Switches::names`] until its definition is stored).
    pub(super) fn check_nic_switches(&self, def: &viv_api::vms::VmDefinition) -> Result<(), ApiError> {
        for nic in &def.nics {
            for (field, rate) in [("rateInKbps", nic.rate_in_kbps), ("rateOutKbps", nic.rate_out_kbps)] {
                let Some(rate) = rate else { continue };
                if nic.switch.is_none() {
                    return Err(ApiError::Conflict(format!(
                        "{field} needs a NIC on a switch (QEMU's user-mode network has no limits)"
                    )));
                }
                if !viv_api::vms::NIC_RATE_KBPS.contains(&rate) {
                    return Err(ApiError::BadRequest(format!(
                        "{field} must be between {} and {} kbit/s, got {rate}",
                        viv_api::vms::NIC_RATE_KBPS.start(),
                        viv_api::vms::NIC_RATE_KBPS.end()
                    )));
                }
            }
            if nic.firewall.is_some() && nic.switch.is_none() {
                return Err(ApiError::Conflict(
                    "firewall needs a NIC on a switch (QEMU's user-mode network has no filter)".into(),
                ));
            }
            super::vm_spec::nic_firewall(nic)?;
            if let Some(name) = &nic.switch {
                super::check_name("switch", name)?;
                if self.store.switch(name)?.is_none() {
                    return Err(ApiError::NotFound(format!(
                        "no switch '{name}': create it (viv switch create {name}) or choose another"
                    )));
                }
            }
        }
        Ok(())
    }

    /// A tap on switch `name`'s bridge for NIC `nic` of VM `vm` (its id; `vm_name` for
    /// messages), with `limits`, and the tap's name.
    pub(super) async fn switch_tap(
        &self,
        (vm, vm_name): (&str, &str),
        nic: &str,
        name: &str,
        limits: viv_net::switches::TapRules,
    ) -> Result<(std::os::fd::OwnedFd, String), ApiError> {
        let (bridge, isolated) = self.switch_bridge(vm_name, name)?;
        let host = self.switch_host();
        let label = viv_net::switches::tap_label(vm, nic);
        tokio::task::spawn_blocking(move || host.open_tap(&bridge, isolated, limits, &label))
            .await
            .map_err(internal)?
            .map_err(|e| ApiError::Internal(format!("attaching VM '{vm_name}' to switch '{name}': {e}")))
    }

    /// Moves the tap of running VM `vm`'s NIC `nic` to switch `name`'s bridge and gives it
    /// `limits`: the guest stays linked and is on the other switch at once.
    pub(super) async fn retarget_tap(
        &self,
        (vm, vm_name): (&str, &str),
        nic: &str,
        name: &str,
        limits: viv_net::switches::TapRules,
    ) -> Result<(), ApiError> {
        let (bridge, isolated) = self.switch_bridge(vm_name, name)?;
        let host = self.switch_host();
        let label = viv_net::switches::tap_label(vm, nic);
        let vm_name = vm_name.to_owned();
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            let tap = host.find_tap(&label).ok_or_else(|| {
                ApiError::Conflict(format!(
                    "VM '{vm_name}''s NIC {nic} has no tap on this host (was it started before this server knew labels? restart the VM)",
                    nic = label.rsplit(':').next().unwrap_or_default()
                ))
            })?;
            host.attach_tap(&tap, &bridge, isolated)
                .and_then(|()| host.limit_tap(&tap, &limits))
                .map_err(|e| ApiError::Internal(format!("moving VM '{vm_name}''s tap {tap} to switch '{name}': {e}")))
        })
        .await
        .map_err(internal)?
    }

    /// The Linux bridge of switch `name` (ours, or a bridged switch's uplink) and whether its
    /// ports are isolated.
    fn switch_bridge(&self, vm_name: &str, name: &str) -> Result<(String, bool), ApiError> {
        let row = self.store.switch(name)?.ok_or_else(|| {
            ApiError::Conflict(format!(
                "VM '{vm_name}' has a NIC on switch '{name}', which does not exist: edit the VM"
            ))
        })?;
        let def = definition(&row)?;
        if let Some(uplink) = uplink_of(&def) {
            self.check_uplink_bridge(&def)?;
            return Ok((uplink.to_owned(), def.port_isolation));
        }
        let bridge = self.bridge_of(&row)?;
        Ok((bridge.name, bridge.port_isolation))
    }

    /// The switches whose bridge, dnsmasq and rules are ours (all but `bridged` ones).
    fn our_switches(&self) -> Result<Vec<SwitchRow>, ApiError> {
        let mut ours = Vec::new();
        for row in self.store.list_switches()? {
            if uplink_of(&definition(&row)?).is_none() {
                ours.push(row);
            }
        }
        Ok(ours)
    }

    /// 409 unless a bridged switch's uplink is a Linux bridge on the host (and not one of ours).
    fn check_uplink_bridge(&self, def: &SwitchDefinition) -> Result<(), ApiError> {
        let Some(uplink) = uplink_of(def) else { return Ok(()) };
        if uplink.starts_with(&format!("vs{}", &self.data_key[..6])) {
            return Err(ApiError::Conflict(format!(
                "uplink '{uplink}' is a bridge of this server's own switches"
            )));
        }
        if !viv_net::switches::is_bridge(uplink) {
            return Err(ApiError::Conflict(format!(
                "uplink '{uplink}' is not a Linux bridge on this host: create it (ip link add {uplink} type bridge) or name another"
            )));
        }
        Ok(())
    }
}
