//! Traffic access tokens (E2B's `allowPublicTraffic: false`): a sandbox created so has a token
//! that every request to its ports other than envd's must carry in `E2B-Traffic-Access-Token`.
//! The token lives in its own table, deleted with the sandbox's row (a trigger), so a sandbox
//! without a row here takes traffic from anyone, as E2B's default public sandboxes do.

use rusqlite::OptionalExtension as _;

use super::{Store, StoreError};

impl Store {
    /// Records the traffic token of sandbox `id`.
    pub fn set_traffic_token(&self, id: &str, token: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT OR REPLACE INTO sandbox_traffic (sandbox_id, token) VALUES (?1, ?2)",
            (id, token),
        )?;
        Ok(())
    }

    /// The traffic token of sandbox `id`, if its ports need one.
    pub fn traffic_token(&self, id: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT token FROM sandbox_traffic WHERE sandbox_id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_one_token_per_sandbox() {
        let dir = std::env::temp_dir().join(format!("viv-store-traffic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("viv.db")).unwrap();
        assert_eq!(store.traffic_token("a").unwrap(), None);
        store.set_traffic_token("a", "t1").unwrap();
        store.set_traffic_token("a", "t2").unwrap();
        assert_eq!(store.traffic_token("a").unwrap().as_deref(), Some("t2"));
        assert_eq!(store.traffic_token("b").unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
