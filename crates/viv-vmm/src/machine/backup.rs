//! Backups of a running machine's disks: the target files are opened by the caller and passed
//! to the jailed QEMU as fd sets, then [`crate::backup::run_backup`] runs in its QMP.
//!
//! Invariant: the fd sets live only while the target nodes are being added (QEMU keeps an open
//! set while a node uses it), so none is left once the backup ends.

use std::fs::File;

use super::Machine;
use crate::backup::{self, BackupDisk, BackupError, BackupSync};

impl Machine {
    /// The format node of disk `id` (`disk-ID`, below any throttle filter), where bitmaps live.
    pub fn disk_format_node(id: &str) -> String {
        format!("disk-{id}")
    }

    /// Backs up disks `(id, target file)` (see [`backup::run_backup`]).
    pub async fn backup(
        &self,
        disks: &[(String, File)],
        sync: BackupSync<'_>,
        new_bitmap: &str,
        progress: &mut (dyn FnMut(f64) + Send),
    ) -> Result<(), BackupError> {
        let mut fdsets = Vec::new();
        let mut targets = Vec::new();
        let mut outcome = Ok(());
        for (id, file) in disks {
            match self.pass(file).await {
                Ok(set) => {
                    fdsets.push(set);
                    targets.push(BackupDisk {
                        node: Self::disk_format_node(id),
                        target: format!("/dev/fdset/{set}"),
                    });
                }
                Err(e) => {
                    outcome = Err(BackupError::from(e));
                    break;
                }
            }
        }
        if outcome.is_ok() {
            // The target nodes keep their descriptors: the sets can go as soon as they are open,
            // which run_backup does first; removing them after it is just as safe.
            outcome = backup::run_backup(&self.qmp, &targets, sync, new_bitmap, progress).await;
        }
        for set in fdsets {
            self.forget_fdset(set).await;
        }
        outcome
    }

    /// Removes the backup bitmaps of disks `ids` but `keep`.
    pub async fn prune_backup_bitmaps(&self, ids: &[String], keep: Option<&str>) -> Result<(), BackupError> {
        let nodes: Vec<String> = ids.iter().map(|id| Self::disk_format_node(id)).collect();
        backup::remove_bitmaps_except(&self.qmp, &nodes, keep).await
    }

    /// Checks that every node in `nodes` has backup bitmap `name`, consistent.
    pub async fn check_backup_bitmap(&self, nodes: &[String], name: &str) -> Result<(), BackupError> {
        backup::check_bitmap(&self.qmp, nodes, name).await
    }
}
