//! Volume rows and the record of which sandbox mounts which volume.
//!
//! Invariant: a volume is in use while a `sandbox_volumes` row names it for a sandbox whose row
//! is starting, running or paused; [`Store::delete_volume`] refuses such a volume in the same
//! statement that would delete it, so a mount recorded concurrently is never lost.

use super::db::{params, Sql as _};

use super::{now_rfc3339, Store, StoreError};

/// A volume row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRow {
    /// Id (also its directory's name under `volumes/`).
    pub id: String,
    /// Name, unique.
    pub name: String,
    /// Bearer token of the content API.
    pub token: String,
}

/// What [`Store::delete_volume`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeDeletion {
    /// The row is gone.
    Deleted,
    /// No such volume.
    Missing,
    /// Sandboxes that are not gone mount it (their ids).
    InUse(Vec<String>),
}

/// States of a sandbox whose mounts count.
const LIVE_STATES: &str = "('starting', 'running', 'paused')";

impl Store {
    /// Records a new volume; `Ok(false)` when its name is taken.
    pub fn insert_volume(&self, row: &VolumeRow) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT INTO volumes (id, name, token, created_at, node_id) VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
            params![row.id, row.name, row.token, now_rfc3339(), self.node_id()],
        )?;
        Ok(n == 1)
    }

    /// A volume by id.
    pub fn volume(&self, id: &str) -> Result<Option<VolumeRow>, StoreError> {
        self.conn()
            .query_row("SELECT id, name, token FROM volumes WHERE id = ?1", params![id], |r| {
                Ok(VolumeRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    token: r.get(2)?,
                })
            })
    }

    /// A volume by name.
    pub fn volume_by_name(&self, name: &str) -> Result<Option<VolumeRow>, StoreError> {
        self.conn().query_row(
            "SELECT id, name, token FROM volumes WHERE name = ?1",
            params![name],
            |r| {
                Ok(VolumeRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    token: r.get(2)?,
                })
            },
        )
    }

    /// Every volume, oldest first.
    pub fn list_volumes(&self) -> Result<Vec<VolumeRow>, StoreError> {
        let mut conn = self.conn();
        conn.query_map(
            "SELECT id, name, token FROM volumes ORDER BY created_at, id",
            params![],
            |r| {
                Ok(VolumeRow {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    token: r.get(2)?,
                })
            },
        )
    }

    /// Deletes a volume's row unless a sandbox that is not gone mounts it; mount records of
    /// gone sandboxes go with it.
    pub fn delete_volume(&self, id: &str) -> Result<VolumeDeletion, StoreError> {
        self.db.transaction(|tx| {
            let exists: Option<i64> = tx.query_row("SELECT 1 FROM volumes WHERE id = ?1", params![id], |r| r.get(0))?;
            if exists.is_none() {
                return Ok(VolumeDeletion::Missing);
            }
            let users: Vec<String> = {
                tx.query_map(
                    &format!(
                        "SELECT DISTINCT m.sandbox_id FROM sandbox_volumes m JOIN sandboxes s ON s.id = m.sandbox_id \
                 WHERE m.volume_id = ?1 AND s.state IN {LIVE_STATES} ORDER BY m.sandbox_id"
                    ),
                    params![id],
                    |r| r.get(0),
                )?
            };
            if !users.is_empty() {
                return Ok(VolumeDeletion::InUse(users));
            }
            tx.execute("DELETE FROM sandbox_volumes WHERE volume_id = ?1", params![id])?;
            tx.execute("DELETE FROM volumes WHERE id = ?1", params![id])?;
            Ok(VolumeDeletion::Deleted)
        })
    }

    /// Records that `sandbox` mounts each `(volume id, path)`.
    pub fn insert_sandbox_volumes(&self, sandbox: &str, mounts: &[(String, String)]) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
        for (volume, path) in mounts {
            tx.execute(
                "INSERT INTO sandbox_volumes (sandbox_id, volume_id, path) VALUES (?1, ?2, ?3) ON CONFLICT (sandbox_id, path) DO UPDATE SET volume_id = excluded.volume_id",
                params![sandbox, volume, path],
            )?;
        }
                Ok(())
        })
    }

    /// The `(volume name, path)` mounts of a sandbox, by path.
    pub fn sandbox_volumes(&self, sandbox: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn();
        conn.query_map(
            "SELECT v.name, m.path FROM sandbox_volumes m JOIN volumes v ON v.id = m.volume_id \
             WHERE m.sandbox_id = ?1 ORDER BY m.path",
            params![sandbox],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// Forgets a sandbox's mounts (its row is gone or failed).
    pub fn delete_sandbox_volumes(&self, sandbox: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM sandbox_volumes WHERE sandbox_id = ?1", params![sandbox])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, name: &str) -> VolumeRow {
        VolumeRow {
            id: id.into(),
            name: name.into(),
            token: format!("t-{id}"),
        }
    }

    #[test]
    fn names_are_unique_and_rows_round_trip() {
        crate::engines::each_engine(|store| {
            assert!(store.insert_volume(&row("a", "one")).unwrap());
            assert!(!store.insert_volume(&row("b", "one")).unwrap());
            assert_eq!(store.volume("a").unwrap(), Some(row("a", "one")));
            assert_eq!(store.volume_by_name("one").unwrap(), Some(row("a", "one")));
            assert_eq!(store.volume("b").unwrap(), None);
            assert_eq!(store.list_volumes().unwrap(), vec![row("a", "one")]);
            assert_eq!(store.delete_volume("a").unwrap(), VolumeDeletion::Deleted);
            assert_eq!(store.delete_volume("a").unwrap(), VolumeDeletion::Missing);
        });
    }

    #[test]
    fn a_volume_mounted_by_a_live_sandbox_is_kept() {
        crate::engines::each_engine(|store| {
            store.insert_volume(&row("v", "data")).unwrap();
            store
                .conn()
                .execute(
                    "INSERT INTO sandboxes (id, template_id, state, started_at, end_at_ms, cpu_count, memory_mb, metadata) \
                     VALUES ('s1', 'base', 'running', '', 0, 1, 512, '{}')",
                    params![],
                )
                .unwrap();
            store
                .insert_sandbox_volumes("s1", &[("v".into(), "/mnt/data".into())])
                .unwrap();
            assert_eq!(
                store.sandbox_volumes("s1").unwrap(),
                vec![("data".into(), "/mnt/data".into())]
            );
            assert_eq!(
                store.delete_volume("v").unwrap(),
                VolumeDeletion::InUse(vec!["s1".into()])
            );
            store
                .conn()
                .execute("UPDATE sandboxes SET state = 'failed' WHERE id = 's1'", params![])
                .unwrap();
            assert_eq!(store.delete_volume("v").unwrap(), VolumeDeletion::Deleted);
            assert!(store.sandbox_volumes("s1").unwrap().is_empty());
        });
    }
}
