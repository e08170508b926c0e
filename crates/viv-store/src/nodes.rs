//! Node rows and the node each sandbox and VM belongs to.
//!
//! Invariants:
//! - a node row is written by its own server (register, heartbeat) or by an operator (drain,
//!   remove); any server may mark a node `down`, and that happens in one conditional statement,
//!   so of several servers noticing at once exactly one gets the node back and reports its
//!   sandboxes lost;
//! - `sandboxes.node_id` and `vms.node_id` are written by the node that runs (or, paused,
//!   holds the files of) the sandbox or VM: [`Store::put_sandbox`] and [`Store::insert_vm`]
//!   stamp the store's own node ([`Store::set_node`]).

use viv_api::nodes::{NodeCapacity, NodeInfo, NodeState};

use super::db::{params, Row, Sql as _};
use super::{Store, StoreError};

/// Sandbox ids with the names of their nodes.
const SANDBOX_NODE_NAMES: &str = "SELECT s.id, n.name FROM sandboxes s JOIN nodes n ON n.id = s.node_id";

/// A node row.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Where other servers reach its API.
    pub url: String,
    /// `all`, `api` or `node` (`viv_api::nodes::NodeRole`).
    pub role: String,
    /// Whether it takes work.
    pub state: NodeState,
    /// Its last report.
    pub capacity: NodeCapacity,
    /// RFC 3339.
    pub started_at: String,
    /// Its last heartbeat, ms since the epoch.
    pub heartbeat_ms: i64,
    /// RFC 3339.
    pub down_since: Option<String>,
}

impl NodeRow {
    /// Whether its role runs VMs (an API server's does not; an unknown role is taken to).
    pub fn runs_vms(&self) -> bool {
        viv_api::nodes::NodeRole::parse(&self.role).is_none_or(viv_api::nodes::NodeRole::runs_vms)
    }

    /// The address of `path` (no leading `/`) of this node's node API, under `/internal`.
    pub fn internal_url(&self, path: &str) -> String {
        format!("{}/internal/{path}", self.url.trim_end_matches('/'))
    }

    /// The row as the API shows it.
    pub fn info(&self, sandboxes: u32, local: bool) -> NodeInfo {
        let heartbeat = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.heartbeat_ms.max(0) as u64);
        NodeInfo {
            id: self.id.clone(),
            name: self.name.clone(),
            url: self.url.clone(),
            role: self.role.clone(),
            state: self.state,
            capacity: self.capacity.clone(),
            started_at: self.started_at.clone(),
            heartbeat_at: humantime::format_rfc3339_millis(heartbeat).to_string(),
            down_since: self.down_since.clone(),
            sandboxes,
            local,
        }
    }
}

const COLUMNS: &str = "id, name, url, role, state, capacity, started_at, heartbeat_ms, down_since";

fn node_row(r: &Row) -> Result<NodeRow, StoreError> {
    let state: String = r.get(4)?;
    let capacity: String = r.get(5)?;
    Ok(NodeRow {
        id: r.get(0)?,
        name: r.get(1)?,
        url: r.get(2)?,
        role: r.get(3)?,
        // A row of a newer server: shown as down rather than trusted.
        state: NodeState::parse(&state).unwrap_or(NodeState::Down),
        capacity: serde_json::from_str(&capacity).unwrap_or_default(),
        started_at: r.get(6)?,
        heartbeat_ms: r.get(7)?,
        down_since: r.get(8)?,
    })
}

fn capacity_json(capacity: &NodeCapacity) -> String {
    serde_json::to_string(capacity).expect("capacity serializes")
}

impl Store {
    /// Makes this store's writes of sandbox and VM rows name node `id` (set once, at start).
    pub fn set_node(&self, id: &str) {
        let _ = self.node.set(id.to_owned());
    }

    /// The node this store's sandbox and VM rows name, once set.
    pub fn node_id(&self) -> Option<&str> {
        self.node.get().map(String::as_str)
    }

    /// The cluster's secret (made by the first caller, `candidate`, and the same for every
    /// server of the store after).
    pub fn cluster_secret(&self, candidate: &str) -> Result<String, StoreError> {
        self.db.transaction(|tx| {
            tx.execute(
                "INSERT INTO cluster_secret (id, secret) VALUES (1, ?1) ON CONFLICT (id) DO NOTHING",
                params![candidate],
            )?;
            tx.query_row("SELECT secret FROM cluster_secret WHERE id = 1", params![], |r| {
                r.get(0)
            })?
            .ok_or_else(|| StoreError::Column("the cluster secret row is missing".into()))
        })
    }

    /// Registers (or re-registers) a node as up; a drained node stays drained.
    pub fn register_node(&self, row: &NodeRow) -> Result<(), StoreError> {
        self.conn().execute(
            &format!(
                "INSERT INTO nodes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, NULL)
                 ON CONFLICT (id) DO UPDATE SET name = excluded.name, url = excluded.url, role = excluded.role,
                 state = CASE WHEN nodes.state = 'draining' THEN 'draining' ELSE excluded.state END,
                 capacity = excluded.capacity, started_at = excluded.started_at,
                 heartbeat_ms = excluded.heartbeat_ms, down_since = NULL"
            ),
            params![
                row.id,
                row.name,
                row.url,
                row.role,
                row.state.as_str(),
                capacity_json(&row.capacity),
                row.started_at,
                row.heartbeat_ms,
            ],
        )?;
        Ok(())
    }

    /// Records a heartbeat of node `id`; returns the state the node had (`None` when an
    /// operator removed it). A node that was marked down is up again.
    pub fn heartbeat_node(
        &self,
        id: &str,
        capacity: &NodeCapacity,
        now_ms: i64,
    ) -> Result<Option<NodeState>, StoreError> {
        self.db.transaction(|tx| {
            let Some(before) = tx.query_row("SELECT state FROM nodes WHERE id = ?1", params![id], |r| {
                r.get::<String>(0)
            })?
            else {
                return Ok(None);
            };
            tx.execute(
                "UPDATE nodes SET heartbeat_ms = ?2, capacity = ?3, down_since = NULL,
                 state = CASE WHEN state = 'down' THEN 'up' ELSE state END WHERE id = ?1",
                params![id, now_ms, capacity_json(capacity)],
            )?;
            Ok(Some(NodeState::parse(&before).unwrap_or(NodeState::Down)))
        })
    }

    /// Marks every node but `me` whose last heartbeat is older than `cutoff_ms` down and reports
    /// each one's running and starting sandboxes failed with `reason(node name)`; returns the
    /// nodes this call marked, with the sandboxes it failed. (A server that looks is alive: its
    /// own heartbeat may only be late, after a stall or a failed write.)
    pub fn mark_stale_nodes_down(
        &self,
        me: &str,
        cutoff_ms: i64,
        now: &str,
        reason: impl Fn(&NodeRow) -> String + Send + Sync,
    ) -> Result<Vec<(NodeRow, Vec<String>)>, StoreError> {
        self.db.transaction(|tx| {
            let marked = tx.query_map(
                &format!(
                    "UPDATE nodes SET state = 'down', down_since = ?2
                     WHERE state <> 'down' AND heartbeat_ms < ?1 AND id <> ?3 RETURNING {COLUMNS}"
                ),
                params![cutoff_ms, now, me],
                node_row,
            )?;
            let mut report = Vec::new();
            for node in marked {
                let lost = tx.query_map(
                    "UPDATE sandboxes SET state = 'failed', error = ?2, vmm_pid = NULL, vmm_identity = NULL, net_slot = NULL
                     WHERE node_id = ?1 AND state IN ('running', 'starting') RETURNING id",
                    params![node.id, reason(&node)],
                    |r| r.get::<String>(0),
                )?;
                report.push((node, lost));
            }
            Ok(report)
        })
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Result<Vec<NodeRow>, StoreError> {
        self.conn().query_map(
            &format!("SELECT {COLUMNS} FROM nodes ORDER BY name, id"),
            params![],
            node_row,
        )
    }

    /// A node by id or, failing that, by name.
    pub fn node(&self, id_or_name: &str) -> Result<Option<NodeRow>, StoreError> {
        self.conn().query_row(
            &format!(
                "SELECT {COLUMNS} FROM nodes WHERE id = ?1
                 UNION ALL SELECT {COLUMNS} FROM nodes WHERE name = ?1 AND id <> ?1 LIMIT 1"
            ),
            params![id_or_name],
            node_row,
        )
    }

    /// Sets a node's state (drain, undrain); `Ok(false)` when there is no such node.
    pub fn set_node_state(&self, id: &str, state: NodeState) -> Result<bool, StoreError> {
        let n = self
            .conn()
            .execute("UPDATE nodes SET state = ?2 WHERE id = ?1", params![id, state.as_str()])?;
        Ok(n > 0)
    }

    /// Moves paused sandbox `sandbox` and the snapshot node holding it (`snapshot`) from node
    /// `from` to node `to`, whose copy of the snapshot's files is complete, in one transaction.
    /// `Ok(false)` (nothing changed) when the sandbox is no longer paused on `from` from that
    /// snapshot: another node moved or resumed it first.
    pub fn move_paused_sandbox(&self, sandbox: &str, snapshot: &str, from: &str, to: &str) -> Result<bool, StoreError> {
        self.db.transaction(|tx| {
            let moved = tx.execute(
                "UPDATE sandboxes SET node_id = ?4
                 WHERE id = ?1 AND snapshot_id = ?2 AND node_id = ?3 AND state = 'paused'",
                params![sandbox, snapshot, from, to],
            )?;
            if moved == 0 {
                return Ok(false);
            }
            tx.execute(
                // A chain moves composed into one whole state.
                "UPDATE snapshots SET node_id = ?3,
                   memory = CASE WHEN memory = 'diff' THEN 'whole' ELSE memory END
                 WHERE id = ?1 AND node_id = ?2",
                params![snapshot, from, to],
            )?;
            Ok(true)
        })
    }

    /// Records that node `node` holds a copy of snapshot node `snapshot`.
    pub fn add_snapshot_replica(&self, snapshot: &str, node: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO snapshot_replicas (snapshot_id, node_id, created_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (snapshot_id, node_id) DO NOTHING",
            params![snapshot, node, super::now_rfc3339()],
        )?;
        Ok(())
    }

    /// The nodes holding a copy of snapshot node `snapshot`, oldest copy first.
    pub fn snapshot_replicas(&self, snapshot: &str) -> Result<Vec<String>, StoreError> {
        self.conn().query_map(
            "SELECT node_id FROM snapshot_replicas WHERE snapshot_id = ?1 ORDER BY created_at, node_id",
            params![snapshot],
            |r| r.get(0),
        )
    }

    /// Forgets every copy of snapshot node `snapshot`; returns the nodes that held one.
    pub fn delete_snapshot_replicas(&self, snapshot: &str) -> Result<Vec<String>, StoreError> {
        self.conn().query_map(
            "DELETE FROM snapshot_replicas WHERE snapshot_id = ?1 RETURNING node_id",
            params![snapshot],
            |r| r.get(0),
        )
    }

    /// The snapshot nodes this store's node holds copies of.
    pub fn local_replicas(&self) -> Result<Vec<String>, StoreError> {
        let Some(node) = self.node_id() else {
            return Ok(Vec::new());
        };
        self.conn().query_map(
            "SELECT snapshot_id FROM snapshot_replicas WHERE node_id = ?1 ORDER BY snapshot_id",
            params![node],
            |r| r.get(0),
        )
    }

    /// Removes a node's row; `Ok(false)` when there is no such node.
    pub fn delete_node(&self, id: &str) -> Result<bool, StoreError> {
        self.db.transaction(|tx| {
            tx.execute("DELETE FROM snapshot_replicas WHERE node_id = ?1", params![id])?;
            Ok(tx.execute("DELETE FROM nodes WHERE id = ?1", params![id])? > 0)
        })
    }

    /// How many running, starting and paused sandboxes each node holds.
    pub fn sandboxes_per_node(&self) -> Result<Vec<(String, u32)>, StoreError> {
        self.conn().query_map(
            "SELECT node_id, COUNT(*) FROM sandboxes
             WHERE node_id IS NOT NULL AND state IN ('running', 'starting', 'paused') GROUP BY node_id",
            params![],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// vCPUs and MiB of the running and starting sandboxes of each node, by node id.
    pub fn committed_per_node(&self) -> Result<std::collections::HashMap<String, (u32, u64)>, StoreError> {
        let rows = self.conn().query_map(
            "SELECT node_id, CAST(SUM(cpu_count) AS BIGINT), CAST(SUM(memory_mb) AS BIGINT) FROM sandboxes
             WHERE node_id IS NOT NULL AND state IN ('running', 'starting') GROUP BY node_id",
            params![],
            |r| Ok((r.get::<String>(0)?, (r.get::<i64>(1)?, r.get::<i64>(2)?))),
        )?;
        Ok(rows
            .into_iter()
            .map(|(node, (cpus, mib))| (node, (cpus.clamp(0, i64::from(u32::MAX)) as u32, mib.max(0) as u64)))
            .collect())
    }

    /// The name of the node of every sandbox a node claimed, by sandbox id (a sandbox's
    /// `clientID`).
    pub fn sandbox_node_names(&self) -> Result<std::collections::HashMap<String, String>, StoreError> {
        let rows = self.conn().query_map(SANDBOX_NODE_NAMES, params![], |r| {
            Ok((r.get::<String>(0)?, r.get::<String>(1)?))
        })?;
        Ok(rows.into_iter().collect())
    }

    /// The name of the node of sandbox `id`, when a node claimed it.
    pub fn sandbox_node_name(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.conn()
            .query_row(&format!("{SANDBOX_NODE_NAMES} WHERE s.id = ?1"), params![id], |r| {
                r.get(1)
            })
    }

    /// The node of a sandbox: `None` when there is no such sandbox, `Some(None)` for a row no
    /// node has claimed.
    pub fn sandbox_node(&self, id: &str) -> Result<Option<Option<String>>, StoreError> {
        self.conn()
            .query_row("SELECT node_id FROM sandboxes WHERE id = ?1", params![id], |r| r.get(0))
    }

    /// The node holding the files of a snapshot node (by id or name), as [`Store::sandbox_node`].
    pub fn snapshot_node(&self, id_or_name: &str) -> Result<Option<Option<String>>, StoreError> {
        self.node_of("snapshots", super::untagged(id_or_name))
    }

    /// The node holding a volume's files (by id or, failing that, name), as
    /// [`Store::sandbox_node`].
    pub fn volume_node(&self, id_or_name: &str) -> Result<Option<Option<String>>, StoreError> {
        self.node_of("volumes", id_or_name)
    }

    /// The node of a VM (by id or name), as [`Store::sandbox_node`].
    pub fn vm_node(&self, id_or_name: &str) -> Result<Option<Option<String>>, StoreError> {
        self.node_of("vms", id_or_name)
    }

    /// The `node_id` of the row of `table` (one of this module's, with `id`, `name` and
    /// `node_id` columns) whose id or, failing that, name is `id_or_name`.
    fn node_of(&self, table: &'static str, id_or_name: &str) -> Result<Option<Option<String>>, StoreError> {
        self.conn().query_row(
            &format!(
                "SELECT node_id FROM {table} WHERE id = ?1
                 UNION ALL SELECT node_id FROM {table} WHERE name = ?1 AND id <> ?1 LIMIT 1"
            ),
            params![id_or_name],
            |r| r.get(0),
        )
    }

    /// Gives this store's node every sandbox and VM row no node has (rows from before nodes).
    pub fn claim_unowned_rows(&self) -> Result<(), StoreError> {
        let Some(node) = self.node_id() else { return Ok(()) };
        let node = node.to_owned();
        self.db.transaction(|tx| {
            tx.execute("UPDATE sandboxes SET node_id = ?1 WHERE node_id IS NULL", params![node])?;
            tx.execute("UPDATE vms SET node_id = ?1 WHERE node_id IS NULL", params![node])?;
            tx.execute("UPDATE snapshots SET node_id = ?1 WHERE node_id IS NULL", params![node])?;
            tx.execute("UPDATE volumes SET node_id = ?1 WHERE node_id IS NULL", params![node])?;
            Ok(())
        })
    }

    /// The sandboxes of this store's node (every sandbox when no node is set), by start time.
    pub fn local_sandboxes(&self) -> Result<Vec<super::SandboxRow>, StoreError> {
        let Some(node) = self.node_id() else {
            return self.sandboxes();
        };
        self.conn().query_map(
            &format!("{} WHERE node_id = ?1 ORDER BY started_at, id", super::SELECT_SANDBOX),
            params![node],
            super::row_to_sandbox,
        )
    }

    /// The snapshot nodes whose files are in this store's node's data directory (every one when
    /// no node is set), oldest first.
    pub fn local_snapshots(&self) -> Result<Vec<super::SnapshotRow>, StoreError> {
        let Some(node) = self.node_id() else {
            return self.snapshots();
        };
        self.conn().query_map(
            &format!("{} WHERE node_id = ?1 ORDER BY created_at, id", super::SELECT_SNAPSHOT),
            params![node],
            super::row_to_snapshot,
        )
    }

    /// The VMs of this store's node (every VM when no node is set), by name.
    pub fn local_vms(&self) -> Result<Vec<super::VmRow>, StoreError> {
        let Some(node) = self.node_id() else {
            return self.list_vms();
        };
        self.conn().query_map(
            &format!(
                "SELECT {} FROM vms WHERE node_id = ?1 ORDER BY name",
                super::vms::COLUMNS
            ),
            params![node],
            super::vms::vm_row,
        )
    }
}

#[cfg(test)]
mod tests {
    use viv_api::nodes::{NodeCapacity, NodeState};
    use viv_api::SandboxState;

    use super::super::engines::each_engine_shared;
    use super::NodeRow;
    use crate::testing::sandbox;

    fn node(id: &str, heartbeat_ms: i64) -> NodeRow {
        NodeRow {
            id: id.into(),
            name: format!("name-{id}"),
            url: format!("http://{id}:3000"),
            role: "all".into(),
            state: NodeState::Up,
            capacity: NodeCapacity {
                vcpus: 2,
                memory_mib: 4096,
                accel: "tcg".into(),
                templates: vec!["py".into()],
                ..NodeCapacity::default()
            },
            started_at: "2026-12-02T00:00:00Z".into(),
            heartbeat_ms,
            down_since: None,
        }
    }

    #[test]
    fn rows_name_the_node_that_wrote_them_and_each_node_sees_its_own() {
        each_engine_shared(|one, two| {
            // A row from before nodes is claimed by the first node to start.
            one.put_sandbox(&sandbox("old")).unwrap();
            assert_eq!(one.sandbox_node("old").unwrap(), Some(None));
            one.set_node("n1");
            two.set_node("n2");
            one.claim_unowned_rows().unwrap();
            assert_eq!(two.sandbox_node("old").unwrap(), Some(Some("n1".into())));
            two.put_sandbox(&sandbox("b")).unwrap();
            assert_eq!(one.sandbox_node("b").unwrap(), Some(Some("n2".into())));
            assert_eq!(one.sandbox_node("none").unwrap(), None);
            let ids = |rows: Vec<super::super::SandboxRow>| rows.into_iter().map(|r| r.id).collect::<Vec<_>>();
            assert_eq!(ids(one.local_sandboxes().unwrap()), ["old"]);
            assert_eq!(ids(two.local_sandboxes().unwrap()), ["b"]);
            assert_eq!(one.sandboxes().unwrap().len(), 2);
            let committed = one.committed_per_node().unwrap();
            assert_eq!(committed.get("n2"), Some(&(2, 512)));
            // VMs too.
            assert!(two.insert_vm("vm1", "web", "{}", "stopped").unwrap());
            assert_eq!(one.vm_node("web").unwrap(), Some(Some("n2".into())));
            assert!(one.local_vms().unwrap().is_empty());
            assert_eq!(two.local_vms().unwrap().len(), 1);
            // Snapshot nodes name the node holding their files.
            let mut node = super::super::suite::snapshot_node("s1", None, "b", super::super::SnapshotKind::Pause);
            two.put_snapshot(&node).unwrap();
            node.id = "s2".into();
            one.put_snapshot(&node).unwrap();
            assert_eq!(one.snapshot_node("s1").unwrap(), Some(Some("n2".into())));
            let local = |store: &super::super::Store| -> Vec<String> {
                store.local_snapshots().unwrap().into_iter().map(|n| n.id).collect()
            };
            assert_eq!((local(one), local(two)), (vec!["s2".to_owned()], vec!["s1".to_owned()]));
        });
    }

    #[test]
    fn a_node_that_stops_heartbeating_is_marked_down_once_and_its_running_sandboxes_lost() {
        each_engine_shared(|one, two| {
            one.set_node("n1");
            two.set_node("n2");
            one.register_node(&node("n1", 10_000)).unwrap();
            two.register_node(&node("n2", 10_000)).unwrap();
            two.put_sandbox(&sandbox("running")).unwrap();
            two.put_sandbox(&paused("paused")).unwrap();
            one.put_sandbox(&sandbox("elsewhere")).unwrap();
            assert_eq!(
                one.heartbeat_node("n1", &NodeCapacity::default(), 20_000).unwrap(),
                Some(NodeState::Up)
            );
            // Both servers look at once: one of them reports n2, never both.
            let reason = |n: &NodeRow| format!("{} is gone", n.name);
            // A node never marks itself down, however late its own heartbeat.
            let own = two.mark_stale_nodes_down("n2", 15_000, "2026-12-02T00:01:00Z", reason);
            assert!(own.unwrap().is_empty());
            let first = one
                .mark_stale_nodes_down("n1", 15_000, "2026-12-02T00:01:00Z", reason)
                .unwrap();
            // A third server, on the second connection, looking right after.
            let second = two
                .mark_stale_nodes_down("n3", 15_000, "2026-12-02T00:01:00Z", reason)
                .unwrap();
            assert!(second.is_empty(), "{second:?}");
            assert_eq!(first.len(), 1);
            assert_eq!(first[0].0.id, "n2");
            assert_eq!(first[0].1, ["running"]);
            let lost = one.sandbox("running").unwrap().unwrap();
            assert_eq!(lost.state, SandboxState::Failed);
            assert_eq!(lost.error.as_deref(), Some("name-n2 is gone"));
            assert!(lost.vmm.is_none() && lost.net_slot.is_none());
            assert_eq!(one.sandbox("paused").unwrap().unwrap().state, SandboxState::Paused);
            assert_eq!(one.sandbox("elsewhere").unwrap().unwrap().state, SandboxState::Running);
            let down = one.node("name-n2").unwrap().unwrap();
            assert_eq!(down.state, NodeState::Down);
            assert_eq!(down.down_since.as_deref(), Some("2026-12-02T00:01:00Z"));
            assert_eq!(
                one.sandboxes_per_node().unwrap(),
                [("n1".to_owned(), 1), ("n2".to_owned(), 1)]
            );

            // Its heartbeat brings it back, and it learns it was down.
            let capacity = NodeCapacity {
                memory_used_mib: 512,
                ..NodeCapacity::default()
            };
            assert_eq!(
                two.heartbeat_node("n2", &capacity, 30_000).unwrap(),
                Some(NodeState::Down)
            );
            let up = one.node("n2").unwrap().unwrap();
            assert_eq!(
                (up.state, up.down_since, up.heartbeat_ms),
                (NodeState::Up, None, 30_000)
            );
            assert_eq!(up.capacity, capacity);

            // A drain survives the node's restart; a removed node learns it at its heartbeat.
            assert!(one.set_node_state("n2", NodeState::Draining).unwrap());
            two.register_node(&node("n2", 40_000)).unwrap();
            assert_eq!(one.node("n2").unwrap().unwrap().state, NodeState::Draining);
            assert!(one.delete_node("n2").unwrap());
            assert!(!one.delete_node("n2").unwrap());
            assert_eq!(two.heartbeat_node("n2", &capacity, 50_000).unwrap(), None);
            assert_eq!(one.nodes().unwrap().len(), 1);
        });
    }

    #[test]
    fn a_paused_sandbox_moves_to_another_node_once() {
        each_engine_shared(|one, two| {
            one.set_node("n1");
            two.set_node("n2");
            let node = super::super::suite::snapshot_node("s1", None, "p", super::super::SnapshotKind::Pause);
            one.put_snapshot(&node).unwrap();
            one.put_sandbox(&super::super::SandboxRow {
                snapshot_id: Some("s1".into()),
                ..paused("p")
            })
            .unwrap();
            // Two nodes adopt it at once: one wins, the other changes nothing.
            assert!(two.move_paused_sandbox("p", "s1", "n1", "n2").unwrap());
            assert!(!one.move_paused_sandbox("p", "s1", "n1", "n3").unwrap());
            assert_eq!(one.sandbox_node("p").unwrap(), Some(Some("n2".into())));
            assert_eq!(one.snapshot_node("s1").unwrap(), Some(Some("n2".into())));
            // Only a paused sandbox from that snapshot moves.
            let mut running = sandbox("r");
            running.snapshot_id = Some("s1".into());
            two.put_sandbox(&running).unwrap();
            assert!(!one.move_paused_sandbox("r", "s1", "n2", "n1").unwrap());
            assert!(!one.move_paused_sandbox("p", "s9", "n2", "n1").unwrap());
            assert_eq!(one.snapshot_node("s1").unwrap(), Some(Some("n2".into())));

            // Copies: recorded once per node, listed per node, forgotten together.
            two.add_snapshot_replica("s1", "n1").unwrap();
            two.add_snapshot_replica("s1", "n1").unwrap();
            one.add_snapshot_replica("s1", "n3").unwrap();
            assert_eq!(two.snapshot_replicas("s1").unwrap().len(), 2);
            assert_eq!(one.local_replicas().unwrap(), ["s1"]);
            assert!(two.local_replicas().unwrap().is_empty());
            assert_eq!(two.snapshot_replicas("s2").unwrap(), Vec::<String>::new());
            let mut gone = one.delete_snapshot_replicas("s1").unwrap();
            gone.sort();
            assert_eq!(gone, ["n1", "n3"]);
            assert!(one.local_replicas().unwrap().is_empty());
        });
    }

    fn paused(id: &str) -> super::super::SandboxRow {
        super::super::SandboxRow {
            state: SandboxState::Paused,
            vmm: None,
            net_slot: None,
            ..sandbox(id)
        }
    }
}
