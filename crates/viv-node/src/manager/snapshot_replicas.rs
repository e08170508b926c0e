//! Copies of paused sandboxes on other nodes (`--pause-replicas N`, or a sandbox's own
//! `pauseReplicas`): a pause on this node returns once N other nodes that are up hold a copy of
//! the new snapshot node, so that when
//! this node dies (`kill -9`, a lost host) the paused sandbox resumes on one of them. The copy is
//! what a move carries (`snapshot_move.rs`): the disk made whole down to the template's layer,
//! the memory and the guest's channel key, fetched by the copying node over the node API.
//!
//! Invariants:
//! - a copy is complete before its row (`snapshot_replicas`) is written, so a row always names
//!   usable files; a copy without a row (a crash between the two, a snapshot deleted meanwhile)
//!   is removed at the copying node's next start, which keeps only its own and its copies' files;
//! - copies exist only while the sandbox is paused from that node: a resume where it was paused,
//!   a move and a deletion of the snapshot drop every copy (rows first, then the files, by asking
//!   each node; one that is down drops its files at its next start);
//! - a copy that could not be made is logged and leaves the pause as it is: the sandbox is
//!   paused, only less safely.

use viv_api::nodes::NodeState;

use super::layer_fetch::peer_client;
use super::{Manager, CLUSTER_SECRET_HEADER};
use crate::error::ApiError;

/// How long a node directory that is not this node's must have been left alone before
/// [`Manager::sweep_foreign_snapshots`] removes it.
const SWEEP_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

impl Manager {
    /// Has as many other nodes that are up as sandbox `sandbox` asks (`pauseReplicas`, else
    /// `--pause-replicas`) copy snapshot node `snapshot`, just made by its pause here; returns
    /// how many did.
    pub(super) async fn replicate_paused(&self, sandbox: &str, snapshot: &str) -> usize {
        let asked = self
            .store
            .lifecycle(sandbox)
            .ok()
            .flatten()
            .and_then(|l| l.pause_replicas);
        let wanted = asked.map_or(self.config.pause_replicas, |n| n as usize);
        let (Some(link), true) = (self.cluster_link.get(), wanted > 0) else {
            return 0;
        };
        let Ok(nodes) = self.store.nodes() else {
            return 0;
        };
        let Ok(client) = peer_client() else {
            return 0;
        };
        let mut targets: Vec<_> = nodes
            .into_iter()
            .filter(|n| n.id != link.node_id && n.state == NodeState::Up)
            .collect();
        // The roomiest disks first.
        targets.sort_by_key(|n| std::cmp::Reverse(n.capacity.disk_free_mib));
        let started = std::time::Instant::now();
        let mut made = 0;
        for node in targets {
            if made == wanted {
                break;
            }
            let url = node.internal_url(&format!("snapshots/{snapshot}/replicate"));
            let answer = client
                .post(&url)
                .header(CLUSTER_SECRET_HEADER, &link.secret)
                .send()
                .await;
            match answer {
                Ok(answer) if answer.status().is_success() => made += 1,
                Ok(answer) => {
                    let status = answer.status();
                    let body = answer.text().await.unwrap_or_default();
                    tracing::warn!(snapshot, node = %node.name, %status, body, "a node could not copy a paused sandbox");
                }
                Err(err) => {
                    tracing::warn!(snapshot, node = %node.name, %err, "a node could not copy a paused sandbox")
                }
            }
        }
        if made < wanted {
            tracing::warn!(
                snapshot,
                made,
                wanted,
                "fewer copies of a paused sandbox than --pause-replicas asks"
            );
        } else {
            tracing::info!(
                snapshot,
                copies = made,
                ms = started.elapsed().as_millis() as u64,
                "paused sandbox copied to other nodes"
            );
        }
        made
    }

    /// For the node API: copies snapshot node `id` from the node holding it to this one.
    pub async fn replicate_snapshot(&self, id: &str) -> Result<(), ApiError> {
        let link = self
            .cluster_link
            .get()
            .ok_or_else(|| ApiError::Internal("this server is not in a cluster".into()))?;
        let row = self
            .store
            .snapshot(id)?
            .ok_or_else(|| ApiError::NotFound(format!("snapshot '{id}' not found")))?;
        let owner = self.store.snapshot_node(&row.id)?.flatten().unwrap_or_default();
        if owner == link.node_id {
            return Err(ApiError::Conflict(format!(
                "snapshot {} is this node's own; a copy goes to another node",
                row.id
            )));
        }
        let from = self
            .store
            .node(&owner)?
            .filter(|n| n.state != NodeState::Down)
            .ok_or_else(|| ApiError::Unavailable(format!("the node holding snapshot {} is not up", row.id)))?;
        // One fetch of a snapshot at a time here (a resume adopting it waits on the same gate).
        let gate = self.resume_gates.gate(&row.sandbox_id);
        let _one = gate.lock().await;
        self.fetch_snapshot(link, &from, &row.id, &row.template_id).await?;
        self.store.add_snapshot_replica(&row.id, &link.node_id)?;
        Ok(())
    }

    /// Removes the node directories that are neither this node's snapshots nor its copies of
    /// others' and that nothing wrote for a minute (so never one an adoption is placing): what
    /// other nodes adopted while this one could not be asked to drop it (it was down or cut
    /// off). Returns how many went.
    pub fn sweep_foreign_snapshots(&self) -> Result<usize, ApiError> {
        let mut kept: std::collections::HashSet<String> =
            self.store.local_snapshots()?.into_iter().map(|n| n.id).collect();
        kept.extend(self.store.local_replicas()?);
        let removed = sweep(&self.config.data_dir.join("snapshots"), &kept, SWEEP_AFTER);
        for name in &removed {
            tracing::info!(snapshot = %name, "removed a snapshot another node holds now");
        }
        Ok(removed.len())
    }

    /// Drops every copy of snapshot node `snapshot` on other nodes (the sandbox resumed where
    /// it was paused, or the snapshot is gone).
    pub(super) fn drop_replicas(&self, snapshot: &str) -> Result<(), ApiError> {
        let nodes = self.store.delete_snapshot_replicas(snapshot)?;
        self.drop_copies_on(nodes.into_iter(), snapshot);
        Ok(())
    }
}

/// Removes the node directories of `root` not named in `kept` (nor in the making: names with a
/// dot) that nothing wrote for `after`; returns their names.
fn sweep(root: &std::path::Path, kept: &std::collections::HashSet<String>, after: std::time::Duration) -> Vec<String> {
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.contains('.') || kept.contains(&name) {
            continue;
        }
        let quiet = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= after);
        if quiet && std::fs::remove_dir_all(entry.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    #[test]
    fn the_sweep_removes_only_quiet_directories_of_other_nodes() {
        let root = tempfile::tempdir().unwrap();
        for dir in ["mine", "copy", "theirs", "new.building", ".export-x"] {
            std::fs::create_dir(root.path().join(dir)).unwrap();
            std::fs::write(root.path().join(dir).join("disk.qcow2"), b"x").unwrap();
        }
        let kept: HashSet<String> = ["mine".to_owned(), "copy".to_owned()].into();
        // Written just now: left alone (an adoption may be placing it).
        assert!(super::sweep(root.path(), &kept, Duration::from_secs(60)).is_empty());
        assert_eq!(super::sweep(root.path(), &kept, Duration::ZERO), ["theirs"]);
        let mut left: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [".export-x", "copy", "mine", "new.building"]);
    }
}
