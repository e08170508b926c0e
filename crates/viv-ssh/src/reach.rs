//! Which agent a session or forward talks to: the sandbox's VM on this server, or, in a cluster,
//! the node that holds the sandbox, through that node's API (an API server runs no VM, so every
//! sandbox it reaches is on a node).
//!
//! Invariants:
//! - a sandbox is reached where its row says it runs: this server when the row names it (or
//!   no node), else the row's node while that node is up; a sandbox whose node is down is not
//!   reached at all (the message says so), never resumed here behind its node's back;
//! - reaching a sandbox wakes it (resumes it when paused) on the node that holds it.

use std::sync::Arc;

use tokio::sync::watch;
use viv_server::agent_client::AgentClient;
use viv_server::manager::LiveSandbox;
use viv_server::process_session::AgentTarget;
use viv_server::AppState;
use viv_vmm::VmExit;

/// How long a broken session waits for its remote sandbox's row to say what happened.
const SETTLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(5);
/// How often it reads the row meanwhile.
const SETTLE_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// A sandbox's agent, as a session or forward reaches it.
pub(crate) enum Reached {
    /// The sandbox runs on this server.
    Local(Arc<LiveSandbox>),
    /// The sandbox runs on another node, reached through its node API.
    Node {
        /// The client for the sandbox's agent behind the node.
        agent: Box<AgentClient>,
        /// The node's name, for messages.
        node: String,
    },
}

impl AgentTarget for Reached {
    fn agent(&self) -> &AgentClient {
        match self {
            Self::Local(live) => &live.agent,
            Self::Node { agent, .. } => agent,
        }
    }

    fn vm_exit(&self) -> Option<watch::Receiver<Option<VmExit>>> {
        match self {
            Self::Local(live) => live.vm_exit(),
            // The node ends the passed-on streams when the VM stops there.
            Self::Node { .. } => None,
        }
    }
}

/// Reaches sandbox `sandbox` (woken, when it is on this server).
pub(crate) async fn reach(state: &AppState, sandbox: &str) -> Result<Reached, String> {
    let owner = state.store.sandbox_node(sandbox).map_err(|e| e.to_string())?.flatten();
    let held = state
        .cluster
        .owner(&state.store, owner.as_deref())
        .map_err(|e| e.to_string())?;
    match held {
        Some(node) => {
            let agent = AgentClient::via_node(&node.url, sandbox, state.cluster.secret()).map_err(|e| e.to_string())?;
            Ok(Reached::Node {
                agent: Box::new(agent),
                node: node.name,
            })
        }
        None if state.cluster.role().runs_vms() => match state.manager.wake(sandbox).await {
            Ok(live) => Ok(Reached::Local(live)),
            Err(err) => Err(err.to_string()),
        },
        None => Err(format!(
            "the node of sandbox {sandbox} is down: it can be reached once its node is back (see viv node list)"
        )),
    }
}

/// Why a session or forward of `reached` broke, in words: what the sandbox's state says when it
/// stopped, paused or moved, else `broke` (the channel's own error).
pub(crate) async fn why_broken(state: &AppState, sandbox: &str, reached: &Reached, broke: String) -> String {
    match reached {
        Reached::Local(live) => {
            // Once the manager settled it, its state says so better than the channel's error.
            state.manager.settle(live).await;
            match state.manager.live(sandbox) {
                Err(now) => now.to_string(),
                Ok(current) if !Arc::ptr_eq(&current, live) => "the sandbox was paused and resumed".to_owned(),
                Ok(_) => broke,
            }
        }
        Reached::Node { node, .. } => {
            // The node breaks the stream as the VM goes, and changes the row right after: a
            // row that still says running is given a moment to settle.
            let deadline = tokio::time::Instant::now() + SETTLE_LIMIT;
            loop {
                match state.store.sandbox(sandbox) {
                    Ok(Some(row)) if row.state == viv_api::SandboxState::Running => {
                        if tokio::time::Instant::now() >= deadline {
                            return format!("{broke} (node {node})");
                        }
                        tokio::time::sleep(SETTLE_POLL).await;
                    }
                    _ => return state.manager.why_not_live(sandbox).to_string(),
                }
            }
        }
    }
}
