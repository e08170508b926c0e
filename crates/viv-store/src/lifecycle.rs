//! Rows of `sandbox_lifecycle`: a sandbox's lifecycle options (E2B's `autoResume`,
//! `autoPauseMemory`), its lifetime, and the environment a boot of its saved disk gets again.
//!
//! Invariant: at most one row per sandbox id; a row whose sandbox is gone is never read as
//! another's (ids are random and never reused) and is removed when the next row is written.

use std::collections::BTreeMap;

use super::db::{params, Sql as _};

use super::{Store, StoreError};

/// A sandbox's lifecycle options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LifecycleRow {
    /// Traffic for the paused sandbox resumes it.
    pub auto_resume: bool,
    /// A pause at the timeout keeps the memory (otherwise only the disk).
    pub pause_memory: bool,
    /// The lifetime in seconds a resume by traffic gives.
    pub timeout_secs: u64,
    /// The environment given at creation, for boots of its saved disk.
    pub env_vars: BTreeMap<String, String>,
    /// Copies of each pause on other nodes; `None`: the pausing server's default.
    pub pause_replicas: Option<u32>,
}

impl Store {
    /// Records a sandbox's lifecycle options (replacing earlier ones) and forgets those of
    /// sandboxes that no longer exist.
    pub fn put_lifecycle(&self, sandbox_id: &str, row: &LifecycleRow) -> Result<(), StoreError> {
        let mut conn = self.conn();
        conn.execute(
            "INSERT INTO sandbox_lifecycle (sandbox_id, auto_resume, pause_memory, timeout_secs, env_vars, pause_replicas)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (sandbox_id) DO UPDATE SET auto_resume = excluded.auto_resume, pause_memory = excluded.pause_memory, timeout_secs = excluded.timeout_secs, env_vars = excluded.env_vars, pause_replicas = excluded.pause_replicas",
            params![
                sandbox_id,
                row.auto_resume,
                row.pause_memory,
                row.timeout_secs as i64,
                serde_json::to_string(&row.env_vars).expect("env serializes"),
                row.pause_replicas.map(i64::from),
            ],
        )?;
        conn.execute(
            "DELETE FROM sandbox_lifecycle WHERE sandbox_id != ?1 AND sandbox_id NOT IN (SELECT id FROM sandboxes)",
            params![sandbox_id],
        )?;
        Ok(())
    }

    /// A sandbox's lifecycle options, if it was created with any recorded.
    pub fn lifecycle(&self, sandbox_id: &str) -> Result<Option<LifecycleRow>, StoreError> {
        let mut conn = self.conn();
        let row = conn.query_row(
            "SELECT auto_resume, pause_memory, timeout_secs, env_vars, pause_replicas FROM sandbox_lifecycle WHERE sandbox_id = ?1",
            params![sandbox_id],
            |r| {
                Ok(LifecycleRow {
                    auto_resume: r.get(0)?,
                    pause_memory: r.get(1)?,
                    timeout_secs: r.get::<i64>(2)?.max(1) as u64,
                    env_vars: r
                        .get::<Option<String>>(3)?
                        .and_then(|j| serde_json::from_str(&j).ok())
                        .unwrap_or_default(),
                    pause_replicas: r.get::<Option<i64>>(4)?.and_then(|n| u32::try_from(n).ok()),
                })
            },
        )?;
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_round_trip_and_orphans_go() {
        crate::engines::each_engine(|store| {
            let row = LifecycleRow {
                auto_resume: true,
                pause_memory: false,
                timeout_secs: 42,
                env_vars: BTreeMap::from([("A".to_owned(), "b".to_owned())]),
                pause_replicas: Some(2),
            };
            store.put_lifecycle("one", &row).unwrap();
            assert_eq!(store.lifecycle("one").unwrap(), Some(row.clone()));
            assert_eq!(store.lifecycle("two").unwrap(), None);
            // "one" has no sandbox row: writing another's forgets it.
            store.put_lifecycle("two", &row).unwrap();
            assert_eq!(store.lifecycle("one").unwrap(), None);
            assert!(store.lifecycle("two").unwrap().is_some());
            let default_copies = LifecycleRow {
                pause_replicas: None,
                ..row
            };
            store.put_lifecycle("two", &default_copies).unwrap();
            assert_eq!(store.lifecycle("two").unwrap(), Some(default_copies));
        });
    }
}
