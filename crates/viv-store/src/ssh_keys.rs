//! SSH public keys registered per API key, and which API key owns each sandbox: what the SSH
//! gateway (`crates/viv-ssh`) decides sign-ins with.
//!
//! Invariants: a public key (by its fingerprint) is registered to at most one API key; a key
//! whose API key is revoked no longer signs in (every lookup joins on an active API key); a
//! sandbox's owner row goes with its sandbox row (a trigger), and a sandbox without one (created
//! before owners were recorded) is reachable by no SSH key.

use super::db::{params, Row, Sql as _};

use super::{now_rfc3339, Store, StoreError};

/// A public key to register, already parsed and checked by the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewSshKey {
    /// Algorithm name, such as `ssh-ed25519`.
    pub algorithm: String,
    /// `SHA256:` and the unpadded base64 of the key blob's SHA-256.
    pub fingerprint: String,
    /// The OpenSSH one-line form without a comment.
    pub public_key: String,
    /// The comment of the line it came from (may be empty).
    pub comment: String,
}

/// A registered SSH key.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SshKeyRow {
    /// Id.
    pub id: String,
    /// The API key it signs in as.
    pub api_key_id: String,
    /// That API key's name.
    pub api_key_name: String,
    /// Algorithm name.
    pub algorithm: String,
    /// `SHA256:...`.
    pub fingerprint: String,
    /// The OpenSSH one-line form without a comment.
    pub public_key: String,
    /// Comment.
    pub comment: String,
    /// RFC 3339.
    pub created_at: String,
}

const SELECT: &str =
    "SELECT s.id, s.api_key_id, k.name, s.algorithm, s.fingerprint, s.public_key, s.comment, s.created_at \
     FROM ssh_keys s JOIN api_keys k ON k.id = s.api_key_id AND k.revoked_at IS NULL";

fn row(r: &Row) -> Result<SshKeyRow, StoreError> {
    Ok(SshKeyRow {
        id: r.get(0)?,
        api_key_id: r.get(1)?,
        api_key_name: r.get(2)?,
        algorithm: r.get(3)?,
        fingerprint: r.get(4)?,
        public_key: r.get(5)?,
        comment: r.get(6)?,
        created_at: r.get(7)?,
    })
}

impl Store {
    /// The id of the active API key whose secret is `key`.
    pub fn key_id(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn().query_row(
            "SELECT id FROM api_keys WHERE key_sha256 = ?1 AND revoked_at IS NULL",
            params![super::hash_key(key)],
            |r| r.get(0),
        )
    }

    /// Ids of the active API keys whose id or prefix is `id_or_prefix` (more than one when a
    /// prefix is shared).
    pub fn active_key_ids(&self, id_or_prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let ids = conn.query_map(
            "SELECT id FROM api_keys WHERE (id = ?1 OR prefix = ?1) AND revoked_at IS NULL ORDER BY created_at, id",
            params![id_or_prefix],
            |r| r.get(0),
        )?;
        Ok(ids)
    }

    /// Registers `key` to API key `api_key_id` under a new `id`. `Err(existing)` when the key
    /// is already registered (to this or another API key).
    pub fn add_ssh_key(
        &self,
        id: &str,
        api_key_id: &str,
        key: &NewSshKey,
    ) -> Result<Result<SshKeyRow, SshKeyRow>, StoreError> {
        let inserted = self.conn().execute(
            "INSERT INTO ssh_keys (id, api_key_id, algorithm, fingerprint, public_key, comment, created_at) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (fingerprint) DO NOTHING",
            params![
                id,
                api_key_id,
                key.algorithm,
                key.fingerprint,
                key.public_key,
                key.comment,
                now_rfc3339()
            ],
        )?;
        // A key of a revoked API key still holds its fingerprint: it is found without the join.
        let mut conn = self.conn();
        let existing = conn
            .query_row(
                "SELECT s.id, s.api_key_id, k.name, s.algorithm, s.fingerprint, s.public_key, s.comment, s.created_at \
             FROM ssh_keys s JOIN api_keys k ON k.id = s.api_key_id WHERE s.fingerprint = ?1",
                params![key.fingerprint],
                row,
            )?
            .ok_or_else(|| StoreError::Column(format!("SSH key {} vanished while it was added", key.fingerprint)))?;
        Ok(if inserted == 1 { Ok(existing) } else { Err(existing) })
    }

    /// Registered keys of active API keys, oldest first; only `api_key_id`'s if given.
    pub fn ssh_keys(&self, api_key_id: Option<&str>) -> Result<Vec<SshKeyRow>, StoreError> {
        let mut conn = self.conn();
        let rows = conn.query_map(
            &format!("{SELECT} WHERE CAST(?1 AS TEXT) IS NULL OR s.api_key_id = ?1 ORDER BY s.created_at, s.id"),
            params![api_key_id],
            row,
        )?;
        Ok(rows)
    }

    /// The registered key with this fingerprint, if its API key is active.
    pub fn ssh_key_by_fingerprint(&self, fingerprint: &str) -> Result<Option<SshKeyRow>, StoreError> {
        self.conn()
            .query_row(&format!("{SELECT} WHERE s.fingerprint = ?1"), params![fingerprint], row)
    }

    /// Removes a registered key by id or fingerprint; whether one was removed.
    pub fn remove_ssh_key(&self, id_or_fingerprint: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "DELETE FROM ssh_keys WHERE id = ?1 OR fingerprint = ?1",
            params![id_or_fingerprint],
        )?;
        Ok(n > 0)
    }

    /// Records that API key `api_key_id` owns sandbox `sandbox_id` (which must have a row).
    pub fn set_sandbox_owner(&self, sandbox_id: &str, api_key_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO sandbox_owners (sandbox_id, api_key_id) \
             SELECT id, ?2 FROM sandboxes WHERE id = ?1 \
             ON CONFLICT (sandbox_id) DO UPDATE SET api_key_id = excluded.api_key_id",
            params![sandbox_id, api_key_id],
        )?;
        Ok(())
    }

    /// The API key that owns sandbox `sandbox_id`, if one was recorded.
    pub fn sandbox_owner(&self, sandbox_id: &str) -> Result<Option<String>, StoreError> {
        self.conn().query_row(
            "SELECT api_key_id FROM sandbox_owners WHERE sandbox_id = ?1",
            params![sandbox_id],
            |r| r.get(0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(fp: &str) -> NewSshKey {
        NewSshKey {
            algorithm: "ssh-ed25519".into(),
            fingerprint: fp.into(),
            public_key: format!("ssh-ed25519 {fp}"),
            comment: "me@laptop".into(),
        }
    }

    #[test]
    fn a_key_belongs_to_one_api_key_and_dies_with_it() {
        crate::engines::each_engine(|store| {
            store.insert_key("k1", "one", "e2b_aaaaaaaaaaaa").unwrap();
            store.insert_key("k2", "two", "e2b_bbbbbbbbbbbb").unwrap();
            assert_eq!(store.key_id("e2b_aaaaaaaaaaaa").unwrap().as_deref(), Some("k1"));
            assert_eq!(store.key_id("e2b_nope").unwrap(), None);
            assert_eq!(store.active_key_ids("e2b_bbbbbb").unwrap(), ["k2"]);

            let added = store.add_ssh_key("s1", "k1", &key("SHA256:one")).unwrap().unwrap();
            assert_eq!(added.api_key_name, "one");
            // The same key again, for either API key, is refused with the existing row.
            let again = store.add_ssh_key("s2", "k2", &key("SHA256:one")).unwrap().unwrap_err();
            assert_eq!(again.id, "s1");
            store.add_ssh_key("s3", "k2", &key("SHA256:two")).unwrap().unwrap();
            assert_eq!(store.ssh_keys(None).unwrap().len(), 2);
            assert_eq!(store.ssh_keys(Some("k2")).unwrap()[0].id, "s3");
            assert_eq!(
                store.ssh_key_by_fingerprint("SHA256:one").unwrap().unwrap().api_key_id,
                "k1"
            );

            // A revoked API key's SSH keys no longer sign in nor list.
            assert!(store.revoke_key("k1").unwrap());
            assert_eq!(store.ssh_key_by_fingerprint("SHA256:one").unwrap(), None);
            assert_eq!(store.ssh_keys(None).unwrap().len(), 1);

            assert!(store.remove_ssh_key("SHA256:two").unwrap());
            assert!(!store.remove_ssh_key("s3").unwrap());
        });
    }

    #[test]
    fn owners_go_with_their_sandboxes() {
        crate::engines::each_engine(|store| {
            // No row, no owner.
            store.set_sandbox_owner("gone", "k1").unwrap();
            assert_eq!(store.sandbox_owner("gone").unwrap(), None);
            store
                .conn()
                .execute(
                    "INSERT INTO sandboxes (id, template_id, state, started_at, end_at_ms, cpu_count, memory_mb, metadata) \
                     VALUES ('sb', 'base', 'running', '', 0, 1, 256, '{}')",
                    params![],
                )
                .unwrap();
            store.set_sandbox_owner("sb", "k1").unwrap();
            assert_eq!(store.sandbox_owner("sb").unwrap().as_deref(), Some("k1"));
            store.delete_sandbox("sb").unwrap();
            assert_eq!(store.sandbox_owner("sb").unwrap(), None);
        });
    }
}
