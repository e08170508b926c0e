//! Wire types of the cluster's nodes (`/nodes`, API key): the servers that run sandboxes and
//! VMs for one store, what each can hold, and whether it is alive.

use serde::{Deserialize, Serialize};

/// Whether a node takes work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// Heartbeating; new sandboxes and VMs may be placed on it.
    Up,
    /// Heartbeating, but an operator drained it: nothing new is placed on it and its running
    /// sandboxes were paused.
    Draining,
    /// It stopped heartbeating for longer than the down time; its running sandboxes were
    /// reported lost. It comes back `up` when its server starts again.
    Down,
}

impl NodeState {
    /// The name stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Up => "up",
            Self::Draining => "draining",
            Self::Down => "down",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "up" => Some(Self::Up),
            "draining" => Some(Self::Draining),
            "down" => Some(Self::Down),
            _ => None,
        }
    }
}

/// What a server of the cluster does (`viv serve --role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// API server and node in one process (one host, or every server of a small cluster).
    #[default]
    All,
    /// Control plane only: the REST API, the web console, the event stream, placement and
    /// forwarding; it runs no VM and takes no placement.
    Api,
    /// VMs only: it serves the requests API servers forward to it and the node API.
    Node,
}

impl NodeRole {
    /// The name stored, shown and given to `--role`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Api => "api",
            Self::Node => "node",
        }
    }

    /// Parses a stored or given name.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "all" => Some(Self::All),
            "api" => Some(Self::Api),
            "node" => Some(Self::Node),
            _ => None,
        }
    }

    /// Whether servers of this role run VMs (and so are placed on).
    pub fn runs_vms(self) -> bool {
        self != Self::Api
    }

    /// Whether servers of this role answer clients directly (not only forwarded requests).
    pub fn serves_clients(self) -> bool {
        self != Self::Node
    }
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for NodeRole {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s).ok_or_else(|| format!("unknown role '{s}': expected all, api or node"))
    }
}

/// What a node can hold and holds now, as of its last heartbeat.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacity {
    /// CPUs its VMs may run on.
    pub vcpus: u32,
    /// Memory guests may use in all, MiB (the host's RAM less its reserve).
    pub memory_mib: u64,
    /// Free space in its data directory, MiB.
    pub disk_free_mib: u64,
    /// The accelerator its VMs run with (`kvm` or `tcg`).
    pub accel: String,
    /// How its sandboxes are networked (`isolated`, `user` or `none`).
    pub network: String,
    /// vCPUs of its running sandboxes and VMs.
    pub vcpus_used: u32,
    /// Memory of its running sandboxes and VMs, MiB.
    pub memory_used_mib: u64,
    /// Built templates whose layers are in its data directory (template locality: placement
    /// prefers a node that holds the template).
    #[serde(default)]
    pub templates: Vec<String>,
}

impl NodeCapacity {
    /// Memory not promised to a running sandbox or VM, MiB.
    pub fn memory_free_mib(&self) -> u64 {
        self.memory_mib.saturating_sub(self.memory_used_mib)
    }
}

/// A node (`GET /nodes`, `GET /nodes/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// Its id (kept in its data directory across restarts).
    pub id: String,
    /// Its name (`--node-name`), also the `clientID` of its sandboxes.
    pub name: String,
    /// The address other servers reach its API at.
    pub url: String,
    /// The role it was started with (`all`, `api` or `node`).
    pub role: String,
    /// Whether it takes work.
    pub state: NodeState,
    /// What it can hold and holds.
    pub capacity: NodeCapacity,
    /// When its server started, RFC 3339.
    pub started_at: String,
    /// Its last heartbeat, RFC 3339.
    pub heartbeat_at: String,
    /// When it was marked down, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub down_since: Option<String>,
    /// Sandboxes whose row names it (running and paused).
    pub sandboxes: u32,
    /// Whether this is the node of the server that answered.
    pub local: bool,
}

/// What `POST /nodes/{id}/drain` did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeDrain {
    /// The node, now `draining`.
    pub node: NodeInfo,
    /// Sandboxes it paused (they resume where placement puts them).
    pub paused: Vec<String>,
    /// Paused sandboxes moved to other nodes, with their files.
    #[serde(default)]
    pub moved: Vec<DrainMove>,
    /// Sandboxes that could not be paused or moved, with why.
    pub failed: Vec<DrainFailure>,
}

/// A paused sandbox a drain moved to another node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainMove {
    /// The sandbox.
    pub id: String,
    /// The name of the node now holding it.
    pub node: String,
}

/// A sandbox a drain could not pause or move.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainFailure {
    /// The sandbox.
    pub id: String,
    /// Why.
    pub error: String,
}
