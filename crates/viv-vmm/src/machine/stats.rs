//! I/O counters of a running machine's block devices, as QMP `query-blockstats` reports them.
//!
//! Invariants: one entry per device attached to the machine (disks, CD-ROM drives, the seed
//! drive), named by its device id; counters are QEMU's since the machine started, so they only
//! grow while it runs.

use super::ops::names_device;
use super::Machine;
use crate::qmp::QmpError;

/// One block device's I/O counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockStats {
    /// The device id (`disk0`, `cd0`, `cidata`, ...).
    pub device: String,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read operations.
    pub read_ops: u64,
    /// Write operations.
    pub write_ops: u64,
}

/// Why block statistics could not be read.
#[derive(Debug, thiserror::Error)]
pub enum BlockStatsError {
    /// The machine is not running any more.
    #[error("cannot read the block statistics: the machine has stopped")]
    Stopped,
    /// QEMU refused the command.
    #[error("cannot read the block statistics: {0}")]
    Refused(QmpError),
}

impl From<QmpError> for BlockStatsError {
    fn from(err: QmpError) -> Self {
        if matches!(err, QmpError::Closed | QmpError::Io(_)) {
            Self::Stopped
        } else {
            Self::Refused(err)
        }
    }
}

/// The device id a `query-blockstats` entry's `qdev` names (a device id, or a QOM path such as
/// `/machine/peripheral/disk0/virtio-backend`).
fn device_id(qdev: &str) -> Option<&str> {
    if qdev.is_empty() {
        return None;
    }
    let id = match qdev.split('/').skip_while(|p| *p != "peripheral").nth(1) {
        Some(id) => id,
        None if !qdev.contains('/') => qdev,
        None => return None,
    };
    debug_assert!(names_device(qdev, id));
    Some(id)
}

/// The entries of a `query-blockstats` answer that belong to devices.
fn parse(answer: &serde_json::Value) -> Vec<BlockStats> {
    let count = |stats: &serde_json::Value, key: &str| stats[key].as_u64().unwrap_or(0);
    answer
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .filter_map(|entry| {
            let device = device_id(entry["qdev"].as_str().unwrap_or_default())?;
            let stats = &entry["stats"];
            Some(BlockStats {
                device: device.to_owned(),
                read_bytes: count(stats, "rd_bytes"),
                write_bytes: count(stats, "wr_bytes"),
                read_ops: count(stats, "rd_operations"),
                write_ops: count(stats, "wr_operations"),
            })
        })
        .collect()
}

impl Machine {
    /// Every device's I/O counters, by device id.
    pub async fn block_stats(&self) -> Result<Vec<BlockStats>, BlockStatsError> {
        let answer = self.qmp.execute("query-blockstats", None).await?;
        Ok(parse(&answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_named_by_their_device() {
        let answer = serde_json::json!([
            {"device": "", "qdev": "/machine/peripheral/disk0/virtio-backend", "node-name": "disk-disk0",
             "stats": {"rd_bytes": 4096, "wr_bytes": 512, "rd_operations": 8, "wr_operations": 1}},
            {"device": "", "qdev": "cd0", "stats": {"rd_bytes": 2048, "wr_bytes": 0, "rd_operations": 1, "wr_operations": 0}},
            {"device": "", "qdev": "", "stats": {"rd_bytes": 1}},
            {"device": "", "qdev": "/machine/unattached/device[3]", "stats": {"rd_bytes": 1}},
        ]);
        assert_eq!(
            parse(&answer),
            vec![
                BlockStats {
                    device: "disk0".into(),
                    read_bytes: 4096,
                    write_bytes: 512,
                    read_ops: 8,
                    write_ops: 1
                },
                BlockStats {
                    device: "cd0".into(),
                    read_bytes: 2048,
                    read_ops: 1,
                    ..BlockStats::default()
                },
            ]
        );
        assert!(parse(&serde_json::json!({})).is_empty());
    }
}
