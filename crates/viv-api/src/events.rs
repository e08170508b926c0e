//! The server's event stream (`GET /events`, server-sent events): one [`Event`] per state change
//! of a VM, a sandbox or a long-running operation, so that the CLI and web pages follow state
//! without polling.

use serde::{Deserialize, Serialize};

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// A VM of the VM manager.
    Vm,
    /// A sandbox.
    Sandbox,
    /// A long-running operation (clone, import, upload, wipe).
    Operation,
    /// A node of the cluster (`up`, `draining`, `down`).
    Node,
}

impl EventKind {
    /// The name the API uses (also the SSE `event:` field).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vm => "vm",
            Self::Sandbox => "sandbox",
            Self::Operation => "operation",
            Self::Node => "node",
        }
    }
}

impl std::str::FromStr for EventKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vm" => Ok(Self::Vm),
            "sandbox" => Ok(Self::Sandbox),
            "operation" => Ok(Self::Operation),
            "node" => Ok(Self::Node),
            other => Err(format!(
                "unknown event kind '{other}': use vm, sandbox, operation or node"
            )),
        }
    }
}

/// One state change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    /// Increases by one per event of this server run (the SSE `id:` field).
    pub seq: u64,
    /// When it happened, RFC 3339 with milliseconds.
    pub at: String,
    /// What it is about.
    pub kind: EventKind,
    /// The VM's, sandbox's or operation's id.
    pub id: String,
    /// The VM's name, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The state it is in now.
    pub state: String,
    /// The state it was in before, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<String>,
    /// Why, in words (a crash's cause, an operation's progress or error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The node it happened on (`viv node list`), on a server of a cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}
