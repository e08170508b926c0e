//! This server as one node of a cluster: servers that share one store (PostgreSQL), each with
//! its own data directory, VMs and address. Every server registers as a node, heartbeats, marks
//! nodes that stopped heartbeating down, places creates on the node with the most free memory,
//! and forwards each request for a sandbox or VM to the node that holds it
//! (`routes/node_forward.rs`). One server alone is a cluster of one: everything is local.
//!
//! Invariants:
//! - a node's id lives in its data directory (`node-id`), so a restarted server is the same
//!   node and takes over its own rows, and only those;
//! - a node is placed on only while `up` and fresh (heartbeat younger than the down time), and
//!   only when its free memory (its capacity less the memory of its running sandboxes and VMs,
//!   the larger of its last report and the store's rows) holds the new sandbox: never over
//!   capacity; vCPUs are shared (overcommitted) and only break ties;
//! - a node that holds the template (its layers) wins over one that would have to get it;
//! - events reach the clients of every server ([`events`], PostgreSQL's `LISTEN`/`NOTIFY`);
//! - marking a node down and reporting its sandboxes lost is one statement any server may run
//!   (`Store::mark_stale_nodes_down`); exactly one server reports each loss.

pub mod events;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use viv_api::nodes::{NodeCapacity, NodeRole, NodeState};

use crate::error::ApiError;
use crate::manager::{now_ms, Manager};
use crate::store::{NodeRow, Store};

/// How a server takes part in the cluster (`viv serve --node-*`).
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// What this server does: `all`, `api` (no VMs, never placed on) or `node`.
    pub role: NodeRole,
    /// The node's name (`clientID` of its sandboxes).
    pub name: String,
    /// Where other servers reach this one's API.
    pub url: String,
    /// How often this node heartbeats and looks for dead nodes.
    pub heartbeat: Duration,
    /// How long a node may miss heartbeats before it is marked down.
    pub down_after: Duration,
}

/// This node and its view of the others.
pub struct Cluster {
    id: String,
    config: ClusterConfig,
    started_at: String,
    /// The node API's secret, shared through the store.
    secret: String,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the secret.
        f.debug_struct("Cluster")
            .field("id", &self.id)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What a create asks of a node.
#[derive(Debug, Clone, Copy)]
pub struct Demand<'a> {
    /// Memory, MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub vcpus: u32,
    /// The template it starts from, when it names a built one.
    pub template: Option<&'a str>,
    /// The node that wins whenever it has room (a paused sandbox's own node, where its files
    /// are).
    pub prefer: Option<&'a str>,
}

/// The node id kept in `data_dir/node-id`, made on first use.
pub fn node_id(data_dir: &Path) -> std::io::Result<String> {
    let path = data_dir.join("node-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if valid_id(id.trim()) => Ok(id.trim().to_owned()),
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{} does not hold a node id (12 letters or digits)", path.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = crate::manager::random_id(12);
            let partial = data_dir.join("node-id.partial");
            std::fs::write(&partial, &id)?;
            std::fs::rename(&partial, &path)?;
            Ok(id)
        }
        Err(e) => Err(e),
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric())
}

impl Cluster {
    /// Registers node `id` (this server) as up with its capacity now.
    pub fn join(store: &Store, manager: &Manager, id: String, config: ClusterConfig) -> Result<Arc<Self>, ApiError> {
        let secret = store.cluster_secret(&crate::manager::random_id(40))?;
        manager.link_cluster(crate::manager::ClusterLink {
            node_id: id.clone(),
            secret: secret.clone(),
        });
        let cluster = Arc::new(Self {
            id,
            config,
            started_at: crate::store::now_rfc3339(),
            secret,
        });
        cluster.register(store, manager.node_capacity()?)?;
        Ok(cluster)
    }

    /// Announces that this node is up (once its events reach the other servers).
    pub fn announce(&self, manager: &Manager) {
        manager.publish_node(
            &self.id,
            &self.config.name,
            "up",
            Some(format!("serving at {}", self.config.url)),
        );
    }

    fn register(&self, store: &Store, capacity: NodeCapacity) -> Result<(), ApiError> {
        store.register_node(&NodeRow {
            id: self.id.clone(),
            name: self.config.name.clone(),
            url: self.config.url.clone(),
            role: self.config.role.as_str().into(),
            state: NodeState::Up,
            capacity,
            started_at: self.started_at.clone(),
            heartbeat_ms: now_ms(),
            down_since: None,
        })?;
        Ok(())
    }

    /// This node's id.
    pub fn node_id(&self) -> &str {
        &self.id
    }

    /// What this server does in the cluster.
    pub fn role(&self) -> NodeRole {
        self.config.role
    }

    /// The secret of the node API.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Heartbeats and looks for dead nodes every heartbeat interval, for as long as the
    /// manager lives.
    pub fn start(self: &Arc<Self>, store: Arc<Store>, manager: &Arc<Manager>, metrics: Arc<crate::Metrics>) {
        if let Some(url) = store.postgres_url() {
            events::link(url, &self.id, &self.config.name, manager);
        }
        self.announce(manager);
        let cluster = self.clone();
        let stopping = manager.stopping();
        let manager = Arc::downgrade(manager);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(cluster.config.heartbeat);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while viv_node::manager::stopping::next_tick(&mut tick, &stopping).await {
                let Some(manager) = manager.upgrade() else { return };
                if let Err(err) = cluster.beat(&store, &manager).await {
                    tracing::warn!(error = %err, "heartbeat failed");
                }
                if let Err(err) = cluster.mark_dead_nodes(&store, &manager, &metrics) {
                    tracing::warn!(error = %err, "looking for dead nodes failed");
                }
            }
        });
    }

    async fn beat(&self, store: &Store, manager: &Arc<Manager>) -> Result<(), ApiError> {
        let capacity = manager.node_capacity()?;
        match store.heartbeat_node(&self.id, &capacity, now_ms())? {
            Some(NodeState::Down) => {
                // Another server gave this node up while it could not heartbeat (a pause, a
                // partition); its running sandboxes were reported lost to their clients.
                tracing::warn!(node = %self.id, "this node was marked down; it is up again");
                let stopped = manager.stop_sandboxes_reported_lost().await;
                if !stopped.is_empty() {
                    tracing::warn!(count = stopped.len(), "stopped sandboxes reported lost");
                }
            }
            Some(_) => {}
            None => {
                tracing::warn!(node = %self.id, "this node's row was removed; registering again");
                self.register(store, capacity)?;
            }
        }
        // Snapshots other nodes adopted while this one could not be asked to drop them (it was
        // down, cut off, or the request failed).
        manager.sweep_foreign_snapshots()?;
        // Templates deleted through another node: their warm VMs and layers here go too.
        if self.config.role.runs_vms() {
            manager.sweep_deleted_templates().await;
        }
        Ok(())
    }

    fn mark_dead_nodes(&self, store: &Store, manager: &Manager, metrics: &crate::Metrics) -> Result<(), ApiError> {
        let cutoff = now_ms() - self.config.down_after.as_millis() as i64;
        let after = self.config.down_after;
        let marked = store.mark_stale_nodes_down(&self.id, cutoff, &crate::store::now_rfc3339_ms(), |node| {
            format!(
                "node {} stopped heartbeating (no heartbeat for {} s); the sandbox is lost",
                node.name,
                after.as_secs()
            )
        })?;
        for (node, lost) in marked {
            metrics.nodes_marked_down.inc();
            tracing::warn!(node = %node.id, name = %node.name, lost = lost.len(), "node marked down: it stopped heartbeating");
            let why = format!("no heartbeat for {} s", after.as_secs());
            manager.publish_node(&node.id, &node.name, "down", Some(why));
            for id in lost {
                metrics.sandboxes_lost_with_node.inc();
                tracing::warn!(sandbox = %id, node = %node.name, "sandbox lost with its node");
                manager.publish_sandbox(&id, "failed", Some(format!("lost with node {}", node.name)));
            }
        }
        Ok(())
    }

    /// The node a sandbox or VM row with node `owner` must be served by: `None` for this node,
    /// for rows no node claimed, and for nodes that are down (their rows say what happened and
    /// are answered here).
    pub fn owner(&self, store: &Store, owner: Option<&str>) -> Result<Option<NodeRow>, ApiError> {
        let Some(owner) = owner.filter(|o| *o != self.id) else {
            return Ok(None);
        };
        Ok(store.node(owner)?.filter(|n| n.state != NodeState::Down))
    }

    /// Whether this node is the only one of `nodes` that runs VMs (then every create is
    /// local). An API server is never alone: it runs nothing itself.
    pub fn alone(&self, nodes: &[NodeRow]) -> bool {
        self.config.role.runs_vms() && nodes.iter().filter(|n| n.runs_vms()).all(|n| n.id == self.id)
    }

    /// The node an API server sends work that belongs to no row yet and must stay on one
    /// node across requests (VM definitions, disks, ISOs, switches, template builds and their
    /// uploads, storage operations): the up node named `asked` (a client's `Viv-Node` header),
    /// else the first up node by name, so that consecutive requests meet on the same node.
    pub fn default_node(&self, nodes: Vec<NodeRow>, asked: Option<&str>) -> Result<NodeRow, ApiError> {
        let fresh_after = now_ms() - self.config.down_after.as_millis() as i64;
        let mut up: Vec<NodeRow> = nodes
            .into_iter()
            .filter(|n| n.runs_vms() && n.state == NodeState::Up && n.heartbeat_ms >= fresh_after)
            .collect();
        up.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        match asked {
            Some(asked) => up
                .into_iter()
                .find(|n| n.name == asked || n.id == asked)
                .ok_or_else(|| {
                    ApiError::Unavailable(format!(
                        "node '{asked}' (the Viv-Node header) is not an up node that runs VMs; see GET /nodes"
                    ))
                }),
            None => up.into_iter().next().ok_or_else(|| {
                ApiError::Unavailable("no node is up to run this (this API server runs no VM); see GET /nodes".into())
            }),
        }
    }

    /// The node of `nodes` (the store's) a create with `demand` runs on: `None` for this one.
    pub fn place(&self, store: &Store, nodes: Vec<NodeRow>, demand: Demand<'_>) -> Result<Option<NodeRow>, ApiError> {
        if self.alone(&nodes) {
            return Ok(None);
        }
        let committed = store.committed_per_node()?;
        let fresh_after = now_ms() - self.config.down_after.as_millis() as i64;
        let mut candidates: Vec<(NodeRow, u64, u32)> = nodes
            .into_iter()
            .filter(|n| n.runs_vms() && n.state == NodeState::Up && (n.id == self.id || n.heartbeat_ms >= fresh_after))
            .map(|n| {
                let (vcpus, memory) = committed.get(&n.id).copied().unwrap_or((0, 0));
                let used = n.capacity.memory_used_mib.max(memory);
                let free = n.capacity.memory_mib.saturating_sub(used);
                let vcpus_used = n.capacity.vcpus_used.max(vcpus);
                (n, free, vcpus_used)
            })
            .filter(|(_, free, _)| *free >= u64::from(demand.memory_mib))
            .collect();
        if candidates.is_empty() {
            return Err(ApiError::NoRoom(format!(
                "no node can take a sandbox of {} MiB: every node is full, drained or down (see GET /nodes)",
                demand.memory_mib
            )));
        }
        if let Some(template) = demand.template {
            if candidates
                .iter()
                .any(|(n, _, _)| n.capacity.templates.iter().any(|t| t == template))
            {
                candidates.retain(|(n, _, _)| n.capacity.templates.iter().any(|t| t == template));
            }
        }
        let best = candidates
            .into_iter()
            .max_by_key(|(n, free, vcpus_used)| {
                let spare_cpus = i64::from(n.capacity.vcpus) - i64::from(*vcpus_used);
                (Some(n.id.as_str()) == demand.prefer, *free, spare_cpus, n.id == self.id)
            })
            .map(|(n, _, _)| n)
            .expect("candidates is not empty");
        Ok((best.id != self.id).then_some(best))
    }
}

#[cfg(test)]
mod tests {
    use viv_api::nodes::{NodeCapacity, NodeState};
    use viv_api::SandboxState;

    use super::*;

    fn cluster(id: &str) -> Cluster {
        Cluster {
            id: id.into(),
            config: ClusterConfig {
                role: NodeRole::All,
                name: id.into(),
                url: format!("http://{id}"),
                heartbeat: Duration::from_secs(1),
                down_after: Duration::from_secs(10),
            },
            started_at: String::new(),
            secret: "s".into(),
        }
    }

    fn node(id: &str, memory_mib: u64, templates: &[&str]) -> NodeRow {
        NodeRow {
            id: id.into(),
            name: id.into(),
            url: format!("http://{id}"),
            role: "all".into(),
            state: NodeState::Up,
            capacity: NodeCapacity {
                vcpus: 2,
                memory_mib,
                templates: templates.iter().map(|t| t.to_string()).collect(),
                ..NodeCapacity::default()
            },
            started_at: String::new(),
            heartbeat_ms: now_ms(),
            down_since: None,
        }
    }

    fn demand(memory_mib: u32, template: Option<&str>) -> Demand<'_> {
        Demand {
            memory_mib,
            vcpus: 1,
            template,
            prefer: None,
        }
    }

    fn preferring<'a>(memory_mib: u32, node: &'a str) -> Demand<'a> {
        Demand {
            prefer: Some(node),
            ..demand(memory_mib, None)
        }
    }

    fn place(cluster: &Cluster, store: &Store, d: Demand<'_>) -> Result<Option<NodeRow>, ApiError> {
        cluster.place(store, store.nodes().unwrap(), d)
    }

    fn placed(cluster: &Cluster, store: &Store, d: Demand<'_>) -> String {
        match place(cluster, store, d).unwrap() {
            None => cluster.id.clone(),
            Some(node) => node.id,
        }
    }

    #[test]
    fn creates_go_where_memory_is_free_preferring_holders_of_the_template_and_this_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("viv.db")).unwrap();
        store.set_node("a");
        let a = cluster("a");
        store.register_node(&node("a", 4096, &[])).unwrap();
        // Alone: local, whatever it asks.
        assert_eq!(placed(&a, &store, demand(512, None)), "a");

        // Equal room: no hop.
        store.register_node(&node("b", 4096, &["py"])).unwrap();
        assert_eq!(placed(&a, &store, demand(512, None)), "a");
        // A's running sandboxes count at once, before its next report.
        store
            .put_sandbox(&crate::store::SandboxRow {
                memory_mb: 1024,
                ..viv_store::testing::sandbox("s1")
            })
            .unwrap();
        assert_eq!(placed(&a, &store, demand(512, None)), "b");
        // A paused sandbox holds no memory.
        let mut paused = viv_store::testing::sandbox("s1");
        paused.state = SandboxState::Paused;
        store.put_sandbox(&paused).unwrap();
        assert_eq!(placed(&a, &store, demand(512, None)), "a");
        // A preferred node (a paused sandbox's own) wins while it has room.
        assert_eq!(placed(&a, &store, preferring(512, "b")), "b");
        assert_eq!(placed(&a, &store, preferring(512, "elsewhere")), "a");

        // The template's holder wins while it has room; never over capacity.
        assert_eq!(placed(&a, &store, demand(512, Some("py"))), "b");
        assert_eq!(placed(&a, &store, demand(4096, Some("py"))), "b");
        let err = place(&a, &store, demand(4097, None)).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::TOO_MANY_REQUESTS, "{err}");
        assert!(err.to_string().contains("no node can take"), "{err}");

        // Drained, down and silent nodes take nothing.
        for state in [NodeState::Draining, NodeState::Down] {
            store.set_node_state("b", state).unwrap();
            assert_eq!(placed(&a, &store, demand(512, Some("py"))), "a");
            assert_eq!(placed(&a, &store, preferring(512, "b")), "a");
        }
        let mut silent = node("b", 8192, &["py"]);
        silent.heartbeat_ms = now_ms() - 60_000;
        store.register_node(&silent).unwrap();
        assert_eq!(placed(&a, &store, demand(512, Some("py"))), "a");
        store.set_node_state("a", NodeState::Draining).unwrap();
        let err = place(&a, &store, demand(512, None)).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
    }

    #[test]
    fn api_servers_are_never_placed_on_and_send_node_local_work_to_one_node() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("viv.db")).unwrap();
        store.set_node("api");
        let mut api = cluster("api");
        api.config.role = NodeRole::Api;
        let mut api_row = node("api", 65536, &[]);
        api_row.role = "api".into();
        store.register_node(&api_row).unwrap();
        // No node: nothing can run anything.
        assert!(!api.alone(&store.nodes().unwrap()));
        let err = place(&api, &store, demand(256, None)).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::TOO_MANY_REQUESTS, "{err}");
        let err = api.default_node(store.nodes().unwrap(), None).unwrap_err();
        assert_eq!(err.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE, "{err}");

        // Creates go to nodes, by free memory, never to the API server however much it has.
        for (id, memory) in [("n2", 2048), ("n1", 1024)] {
            let mut row = node(id, memory, &[]);
            row.role = "node".into();
            store.register_node(&row).unwrap();
        }
        assert_eq!(placed(&api, &store, demand(256, None)), "n2");
        assert_eq!(placed(&api, &store, demand(2048, None)), "n2");
        assert!(place(&api, &store, demand(4096, None)).is_err());
        // A node alone among nodes places locally, whatever API servers there are.
        let n1 = cluster("n1");
        assert!(!n1.alone(&store.nodes().unwrap()));
        store.delete_node("n2").unwrap();
        assert!(n1.alone(&store.nodes().unwrap()));

        // Node-local work: the node asked for (by name or id), else the first up by name.
        store.register_node(&node("n2", 2048, &[])).unwrap();
        let default = |asked| api.default_node(store.nodes().unwrap(), asked).map(|n| n.id);
        assert_eq!(default(None).unwrap(), "n1");
        assert_eq!(default(Some("n2")).unwrap(), "n2");
        for wrong in ["api", "nowhere"] {
            let err = default(Some(wrong)).unwrap_err();
            assert_eq!(err.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE, "{err}");
            assert!(err.to_string().contains(wrong), "{err}");
        }
        store.set_node_state("n1", NodeState::Down).unwrap();
        assert_eq!(default(None).unwrap(), "n2");
    }
}
