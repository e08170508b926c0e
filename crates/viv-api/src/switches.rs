//! Wire types of the VM switches (`/switches`, API key): Linux bridges the server owns, which
//! VM NICs attach to (`VmNic::switch`).

use serde::{Deserialize, Serialize};

/// What a switch connects its VMs to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SwitchKind {
    /// A private subnet with DHCP and DNS from the server, masqueraded out of the host's
    /// uplink.
    #[default]
    Nat,
    /// VMs reach only each other (and the switch's DHCP server); nothing is forwarded in or out.
    Isolated,
    /// A subnet the host routes in both directions without translation: DHCP and DNS as on
    /// `nat`, VMs keep their addresses out of the host, and whatever routes the subnet to the
    /// host reaches them.
    Routed,
    /// NICs on a bridge the operator owns (`uplink`), on whatever network it is part of: no
    /// subnet, DHCP or rules of ours.
    Bridged,
}

impl SwitchKind {
    /// The name as the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nat => "nat",
            Self::Isolated => "isolated",
            Self::Routed => "routed",
            Self::Bridged => "bridged",
        }
    }
}

/// The settings of a switch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SwitchDefinition {
    /// Kind.
    #[serde(default)]
    pub kind: SwitchKind,
    /// IPv4 subnet (`a.b.c.d/p`, /16 to /29); the host takes its first address and hands out
    /// the rest by DHCP. Allocated from the server's switch range (a /24) when absent at create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// VMs on the switch cannot reach each other (bridge ports isolated), only the host's side.
    #[serde(default)]
    pub port_isolation: bool,
    /// The host's Linux bridge a `bridged` switch puts NICs on (it must exist; the server never
    /// changes or removes it). Only for `bridged`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
}

/// `POST /switches` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewSwitch {
    /// Name, unique on the server.
    pub name: String,
    /// Settings.
    #[serde(flatten)]
    pub definition: SwitchDefinition,
}

/// A switch as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SwitchInfo {
    /// Name.
    pub name: String,
    /// Kind.
    pub kind: SwitchKind,
    /// IPv4 subnet (none for `bridged`: the operator's network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
    /// The host's address on the switch (gateway and DNS of `nat` and `routed` switches; none
    /// for `bridged`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_address: Option<String>,
    /// Whether VMs on it are kept from reaching each other.
    pub port_isolation: bool,
    /// The Linux bridge.
    pub bridge: String,
    /// VMs with a NIC on it (names).
    pub vms: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
}
