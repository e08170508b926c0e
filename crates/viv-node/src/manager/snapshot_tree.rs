//! One snapshot tree over sandboxes and VMs (`GET /snapshot-tree`): every sandbox snapshot node
//! and every VM snapshot, each with its kind, owner, parent and size, and a VM made from a
//! sandbox snapshot hanging under that node.
//!
//! Storage stays as it is, two kinds under one view: sandbox nodes are external layers
//! (`snapshots/<id>/disk.qcow2` backed by their parent, plus a state file), because a sandbox's
//! disk is an anonymous overlay the server owns and forks share layers; VM snapshots are
//! internal snapshots inside the VM's named pool disks, because those disks are what users
//! attach, download and clone and must keep their names (see `vm_snapshots.rs`). Unifying the
//! storage would force one of the two into the other's shape for no gain to either; the tree is
//! what users see.
//!
//! Invariants (the rules each kind keeps, unchanged, which together never remove what a
//! descendant needs):
//! - a sandbox node is deleted or collected only when no node names it as parent and no
//!   running or paused sandbox descends from it (`snapshots.rs`);
//! - a VM snapshot lives inside its own VM's disks and backs nothing outside them: deleting
//!   one moves its children to its parent, and deleting a VM deletes its snapshots;
//! - a VM made from a sandbox snapshot holds a copy of its disk, so it never keeps the node
//!   alive: the link is history (`vms.origin`), shown while the node exists.

use std::collections::HashSet;

use viv_api::vms::SnapshotTreeNode;

use super::vms::{definition_of, writable_disks};
use super::Manager;
use crate::error::ApiError;

impl Manager {
    /// Every snapshot of sandboxes and VMs, oldest first.
    pub async fn snapshot_tree(&self) -> Result<Vec<SnapshotTreeNode>, ApiError> {
        let nodes = self.store.snapshots()?;
        let sandbox_ids: HashSet<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
        let mut tree: Vec<SnapshotTreeNode> = nodes
            .iter()
            .map(|n| SnapshotTreeNode {
                id: n.id.clone(),
                kind: "sandbox".into(),
                reason: n.kind.as_str().into(),
                name: n.name.clone(),
                parent_id: n.parent_id.clone(),
                owner_id: n.sandbox_id.clone(),
                memory: !self.node_dir(&n.id).join(super::lifecycle::DISK_ONLY).exists(),
                size_bytes: n.bytes,
                created_at: n.created_at.clone(),
            })
            .collect();
        for vm in self.store.list_vms()? {
            let snapshots = self.store.vm_snapshots(&vm.id)?;
            if snapshots.is_empty() {
                continue;
            }
            let origin = self
                .store
                .vm_origin(&vm.id)?
                .and_then(|o| o.strip_prefix("snapshot:").map(str::to_owned))
                .filter(|o| sandbox_ids.contains(o.as_str()));
            // Memory and device state are in the first writable disk.
            let first = definition_of(&vm.definition)
                .ok()
                .and_then(|d| writable_disks(&d).into_iter().next());
            let sizes = match &first {
                Some(disk) => self.storage.disk_snapshot_sizes(disk).await.unwrap_or_default(),
                None => Default::default(),
            };
            for s in snapshots {
                tree.push(SnapshotTreeNode {
                    size_bytes: sizes.get(&s.id).copied().unwrap_or(0),
                    id: s.id,
                    kind: "vm".into(),
                    reason: "vm-snapshot".into(),
                    name: Some(s.name),
                    parent_id: s.parent_id.or_else(|| origin.clone()),
                    owner_id: vm.id.clone(),
                    memory: s.memory,
                    created_at: s.created_at,
                });
            }
        }
        tree.sort_by(|a, b| (&a.created_at, &a.id).cmp(&(&b.created_at, &b.id)));
        Ok(tree)
    }
}
