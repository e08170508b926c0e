//! Web console sessions (table `web_sessions`): a session is a random token handed to a browser
//! in a cookie after it signed in with an API key. Only the token's SHA-256 is stored, so the
//! database never holds anything a browser could present.
//!
//! Invariants: a session is valid only before its expiry and while its key exists and is not
//! revoked (checked at every use, so revoking a key ends its sessions at once); expired rows are
//! removed whenever a session is created.

use super::db::{params, Sql as _};

use super::{hash_key, now_rfc3339, Store, StoreError};

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A new session.
#[derive(Debug, Clone)]
pub struct NewSession {
    /// The token to hand to the browser (never stored in clear).
    pub token: String,
    /// Its expiry, milliseconds since the epoch.
    pub expires_at_ms: i64,
}

/// A valid session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSession {
    /// The id of the API key it was opened with (whose sandboxes it reaches).
    pub key_id: String,
    /// Its expiry, milliseconds since the epoch.
    pub expires_at_ms: i64,
}

impl Store {
    /// Opens a session for `key` lasting `ttl`, or `None` when the key is unknown or revoked.
    pub fn create_web_session(&self, key: &str, ttl: std::time::Duration) -> Result<Option<NewSession>, StoreError> {
        let mut conn = self.conn();
        let now = now_ms();
        conn.execute("DELETE FROM web_sessions WHERE expires_at_ms <= ?1", params![now])?;
        let key_id: Option<String> = conn.query_row(
            "SELECT id FROM api_keys WHERE key_sha256 = ?1 AND revoked_at IS NULL",
            params![hash_key(key)],
            |r| r.get(0),
        )?;
        let Some(key_id) = key_id else {
            return Ok(None);
        };
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut secret);
        let token = hex::encode(secret);
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let expires_at_ms = now.saturating_add(ttl_ms);
        conn.execute(
            "INSERT INTO web_sessions (token_sha256, key_id, created_at, expires_at_ms) VALUES (?1, ?2, ?3, ?4)",
            params![hash_key(&token), key_id, now_rfc3339(), expires_at_ms],
        )?;
        Ok(Some(NewSession { token, expires_at_ms }))
    }

    /// The session with this token, if it is valid now.
    pub fn web_session(&self, token: &str) -> Result<Option<WebSession>, StoreError> {
        self.conn().query_row(
            "SELECT s.key_id, s.expires_at_ms FROM web_sessions s JOIN api_keys k ON k.id = s.key_id \
                 WHERE s.token_sha256 = ?1 AND s.expires_at_ms > ?2 AND k.revoked_at IS NULL",
            params![hash_key(token), now_ms()],
            |r| {
                Ok(WebSession {
                    key_id: r.get(0)?,
                    expires_at_ms: r.get(1)?,
                })
            },
        )
    }

    /// Ends the session with this token; returns whether there was one.
    pub fn delete_web_session(&self, token: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM web_sessions WHERE token_sha256 = ?1",
            params![hash_key(token)],
        )?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn sessions_live_until_expiry_logout_or_revocation() {
        crate::engines::each_engine(|store| {
            store.insert_key("k1", "one", "e2b_secret1").unwrap();
            assert!(store
                .create_web_session("e2b_wrong", Duration::from_secs(60))
                .unwrap()
                .is_none());
            let s = store
                .create_web_session("e2b_secret1", Duration::from_secs(60))
                .unwrap()
                .unwrap();
            assert_eq!(s.token.len(), 64);
            let valid = store.web_session(&s.token).unwrap().unwrap();
            assert_eq!((valid.key_id.as_str(), valid.expires_at_ms), ("k1", s.expires_at_ms));
            assert_eq!(store.web_session("other").unwrap(), None);
            // Logout.
            assert!(store.delete_web_session(&s.token).unwrap());
            assert!(!store.delete_web_session(&s.token).unwrap());
            assert_eq!(store.web_session(&s.token).unwrap(), None);
            // Expiry.
            let short = store
                .create_web_session("e2b_secret1", Duration::ZERO)
                .unwrap()
                .unwrap();
            assert_eq!(store.web_session(&short.token).unwrap(), None);
            // Revocation ends a live session.
            let live = store
                .create_web_session("e2b_secret1", Duration::from_secs(60))
                .unwrap()
                .unwrap();
            assert!(store.revoke_key("k1").unwrap());
            assert_eq!(store.web_session(&live.token).unwrap(), None);
            // The token itself is never stored.
            let stored: i64 = store
                .conn()
                .query_row(
                    "SELECT count(*) FROM web_sessions WHERE token_sha256 = ?1",
                    params![&live.token],
                    |r| r.get(0),
                )
                .unwrap()
                .unwrap();
            assert_eq!(stored, 0);
        });
    }
}
