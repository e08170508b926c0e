//! Vivarium's node: what runs VMs on one host. The sandbox and VM manager, the agent channel,
//! interactive processes, the host's capacity, and the metrics and events of this host's work.
//!
//! The control plane (`viv-server`: REST API, authentication, placement, routing between nodes)
//! drives a node in-process through [`Manager`] when both run in one server (`--role all` and
//! `--role node`), and over the node API ([`node_api`], authenticated by the cluster's secret)
//! from another server. Nothing here knows about the public routes or placement; the
//! node reaches other nodes only through the node API's client ([`manager::ClusterLink`]).
//!
//! Code map:
//! - [`manager`]: sandbox and VM lifecycle (boot, restore, watch, timeouts, kill, recovery),
//!   templates and their builds, snapshots, volumes, switches, storage, migrations;
//! - [`capacity`]: the largest VM the host can run and whether it has room for one more;
//! - [`agent_client`]: HTTP/2 client for a sandbox's agent over its virtio-serial socket;
//! - [`process_session`]: an interactive process (PTY or pipes) in a sandbox, for terminals and SSH;
//! - [`metrics`]: the host's Prometheus counters;
//! - [`node_api`]: the node API's routes (`/internal/…`, the cluster's secret), which other
//!   servers call; [`extract`]: request extractors that answer bad input with an [`ApiError`];
//! - [`error`]: [`ApiError`], the one error type of the node and of the REST API, mapped to
//!   HTTP statuses;
//! - [`store`]: the state store (re-exported `viv-store`).

pub mod agent_client;
pub mod capacity;
pub mod error;
pub mod extract;
pub mod manager;
pub mod metrics;
pub mod node_api;
pub mod process_session;
pub use viv_store as store;

pub use error::ApiError;
pub use manager::{Config, Manager, NetworkMode, Recovery, ShutdownMode};
pub use metrics::Metrics;
pub use process_session::{ProcessSession, ProcessSpec, SessionEvent, SessionInput};
pub use store::Store;
