//! Traffic access tokens (E2B's `allowPublicTraffic: false`): a sandbox created so has a token
//! that every request to its ports other than envd's must carry in `E2B-Traffic-Access-Token`.
//! The token lives in its own table, deleted with the sandbox's row ([`Store::delete_sandbox`]),
//! so a sandbox without a row here takes traffic from anyone, as E2B's default public sandboxes
//! do.

use super::db::{params, Sql as _};
use super::{Store, StoreError};

impl Store {
    /// Records the traffic token of sandbox `id`.
    pub fn set_traffic_token(&self, id: &str, token: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO sandbox_traffic (sandbox_id, token) VALUES (?1, ?2) ON CONFLICT (sandbox_id) DO UPDATE SET token = excluded.token",
            params![id, token],
        )?;
        Ok(())
    }

    /// The traffic token of sandbox `id`, if its ports need one.
    pub fn traffic_token(&self, id: &str) -> Result<Option<String>, StoreError> {
        self.conn().query_row(
            "SELECT token FROM sandbox_traffic WHERE sandbox_id = ?1",
            params![id],
            |r| r.get(0),
        )
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeps_one_token_per_sandbox() {
        crate::engines::each_engine(|store| {
            assert_eq!(store.traffic_token("a").unwrap(), None);
            store.set_traffic_token("a", "t1").unwrap();
            store.set_traffic_token("a", "t2").unwrap();
            assert_eq!(store.traffic_token("a").unwrap().as_deref(), Some("t2"));
            assert_eq!(store.traffic_token("b").unwrap(), None);
        });
    }
}
