//! Vivarium's server: the REST API over the sandbox manager.
//!
//! Code map:
//! - [`routes`]: the axum router, authentication, request handlers;
//! - [`manager`]: sandbox lifecycle (boot, watch, timeouts, kill, recovery);
//! - [`cluster`]: this server as a node among the servers sharing one store (placement,
//!   heartbeats, dead nodes); `routes/node_forward.rs` sends requests to the node holding their
//!   sandbox or VM;
//! - [`capacity`]: the largest VM the host can run and whether it has room for one more;
//! - [`agent_client`]: HTTP/2 client for a sandbox's agent over its virtio-serial socket;
//! - [`process_session`]: an interactive process (PTY or pipes) in a sandbox, for terminals and SSH;
//! - [`store`]: SQLite persistence with embedded migrations;
//! - [`error`]: [`ApiError`], the one error type routes return, mapped to HTTP statuses.

pub mod agent_client;
pub mod capacity;
pub mod cluster;
pub mod error;
pub mod manager;
pub mod metrics;
pub mod process_session;
pub mod routes;
pub use viv_store as store;

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
