//! Vivarium's control plane: the REST API, authentication, the event stream, placement and the
//! routing of each request to the node that holds its sandbox or VM. The node itself (VMs,
//! agent channel, images) is the `viv-node` crate; this crate drives the node of its own server
//! in-process through [`Manager`] and other nodes over the node API (`/internal/…`).
//!
//! Code map:
//! - [`routes`]: the axum router, authentication, request handlers (the node API's,
//!   `viv_node::node_api`, merged in); `routes/node_forward.rs` sends a request to the node holding
//!   its sandbox or VM;
//! - [`cluster`]: this server among the servers sharing one store (membership, heartbeats, dead
//!   nodes, placement, cluster-wide events);
//! - re-exported from `viv-node`: [`manager`], [`agent_client`], [`process_session`],
//!   [`capacity`], [`metrics`], [`error`] ([`ApiError`]), and [`store`] (`viv-store`).

pub mod cluster;
pub mod routes;
pub use viv_node::{agent_client, capacity, error, manager, metrics, process_session, store};

pub use error::ApiError;
pub use manager::{Config, Manager, NetworkMode, Recovery, ShutdownMode};
pub use metrics::Metrics;
pub use process_session::{ProcessSession, ProcessSpec, SessionEvent, SessionInput};
pub use store::Store;

use std::sync::Arc;

/// Creates an API key in E2B's format (`e2b_` and 40 hex digits), records its hash and returns
/// the key with its public facts.
pub fn create_api_key(store: &Store, name: &str) -> Result<viv_api::NewApiKey, store::StoreError> {
    let mut secret = [0u8; 20];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut secret);
    let key = format!("e2b_{}", hex::encode(secret));
    let info = store.insert_key(&manager::random_id(12), name, &key)?;
    Ok(viv_api::NewApiKey { info, key })
}

/// Shared state of the request handlers.
#[derive(Clone)]
pub struct AppState {
    /// The sandbox manager.
    pub manager: Arc<Manager>,
    /// The store.
    pub store: Arc<Store>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// How long a web console session lasts after sign-in.
    pub session_ttl: std::time::Duration,
    /// `GET /metrics` answers without an API key (`viv serve --public-metrics`).
    pub public_metrics: bool,
    /// This server as a node of its cluster.
    pub cluster: Arc<cluster::Cluster>,
}

impl axum::extract::FromRef<AppState> for Arc<Manager> {
    fn from_ref(state: &AppState) -> Self {
        state.manager.clone()
    }
}
