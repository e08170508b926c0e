//! Persistent state: API keys (hashed), SSH keys and sandbox owners, sandboxes, snapshot nodes,
//! built templates, volumes and VMs, in SQLite (one server's file, the default) or PostgreSQL
//! (shared by the API servers of a cluster); see [`db`] for what the two engines share.
//!
//! Migrations are embedded in the binary, one list per engine, and applied in order at open:
//! SQLite's `PRAGMA user_version` or PostgreSQL's `viv_schema` table records how many have run.
//! PostgreSQL's list starts from the schema SQLite's list had reached when it was added (there
//! were no PostgreSQL databases before), and each later change is one entry in both lists.
//! Calls are synchronous and short; SQLite's connection sits behind a mutex, PostgreSQL's
//! connections are a small pool (`db`).
//!
//! This crate is the one store the control plane (API servers) and the nodes share; it knows
//! rows, not VMs: nothing here starts, stops or reads a VM or a file of a data directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use db::{params, Db, Row, Sql as _};
use sha2::{Digest, Sha256};
use viv_api::{ApiKeyInfo, SandboxState};

pub mod db;
#[cfg(test)]
mod engines;
mod lifecycle;
#[cfg(test)]
mod suite;
pub use lifecycle::LifecycleRow;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
mod vm_backups;
mod vm_snapshots;
mod vms;
pub use vm_backups::VmBackupRow;
pub use vm_snapshots::VmSnapshotRow;
pub use vms::VmRow;
mod volumes;
pub use volumes::{VolumeDeletion, VolumeRow};
mod web_sessions;
pub use web_sessions::{NewSession, WebSession};

/// Embedded migrations, applied in order.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_snapshots.sql"),
    include_str!("migrations/0003_templates.sql"),
    include_str!("migrations/0004_network.sql"),
    include_str!("migrations/0005_network_rules.sql"),
    include_str!("migrations/0006_snapshot_network.sql"),
    include_str!("migrations/0007_vm_identity.sql"),
    include_str!("migrations/0008_lifecycle.sql"),
    include_str!("migrations/0009_files_traffic.sql"),
    include_str!("migrations/0010_template_builds.sql"),
    include_str!("migrations/0011_volumes.sql"),
    include_str!("migrations/0012_vms.sql"),
    include_str!("migrations/0015_vm_runtime.sql"),
    include_str!("migrations/0016_vm_snapshots.sql"),
    include_str!("migrations/0017_ssh_keys.sql"),
    include_str!("migrations/0018_web_sessions.sql"),
    include_str!("migrations/0019_vm_origin.sql"),
    include_str!("migrations/0020_template_versions.sql"),
    include_str!("migrations/0021_switches.sql"),
    include_str!("migrations/0023_vm_backups.sql"),
    include_str!("migrations/0024_nodes.sql"),
    include_str!("migrations/0025_snapshot_replicas.sql"),
    include_str!("migrations/0026_pause_replicas.sql"),
    include_str!("migrations/0027_snapshot_memory.sql"),
];

/// Embedded PostgreSQL migrations, applied in order (see the module's documentation).
const POSTGRES_MIGRATIONS: &[&str] = &[
    include_str!("migrations/postgres/0001_schema.sql"),
    include_str!("migrations/postgres/0002_nodes.sql"),
    include_str!("migrations/postgres/0003_snapshot_replicas.sql"),
    include_str!("migrations/postgres/0004_pause_replicas.sql"),
    include_str!("migrations/postgres/0005_snapshot_memory.sql"),
];

/// The advisory lock PostgreSQL migrations run under, so that API servers starting at once
/// apply each migration once.
const MIGRATION_LOCK: i64 = 0x7669_7661_7269_756d;

mod nodes;
pub use nodes::NodeRow;
mod ssh_keys;
mod switches;
pub use ssh_keys::{NewSshKey, SshKeyRow};
pub use switches::SwitchRow;
mod template_versions;
pub use template_versions::VersionRow;
mod traffic;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// PostgreSQL failed or could not be reached.
    #[error("database: {0}")]
    Postgres(#[from] postgres::Error),
    /// A column held what its reader did not expect.
    #[error("database: {0}")]
    Column(String),
    /// The database was written by a newer Vivarium.
    #[error("the database has schema version {found}, newer than this binary's {known}; upgrade Vivarium")]
    TooNew {
        /// Version in the file.
        found: usize,
        /// Latest version this binary knows.
        known: usize,
    },
}

impl StoreError {
    /// Whether the database could not be reached or went away (PostgreSQL restarting, a broken
    /// connection): the request may succeed when retried.
    pub fn is_unavailable(&self) -> bool {
        let Self::Postgres(err) = self else { return false };
        match err.as_db_error() {
            None => true,
            // Class 08: connection exception; 57: operator intervention (shutdown, restart).
            Some(db) => matches!(&db.code().code()[..2], "08" | "57"),
        }
    }
}

/// A sandbox row.
#[derive(Debug, Clone)]
pub struct SandboxRow {
    /// Id.
    pub id: String,
    /// Template or image name.
    pub template_id: String,
    /// Lifecycle state.
    pub state: SandboxState,
    /// Start time, RFC 3339.
    pub started_at: String,
    /// Deadline, ms since the epoch.
    pub end_at_ms: i64,
    /// vCPUs.
    pub cpu_count: u32,
    /// Memory in MiB.
    pub memory_mb: u32,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
    /// The agent's access token.
    pub access_token: Option<String>,
    /// The VMM process while running (pid and start time).
    pub vmm: Option<viv_vmm::ProcessIdentity>,
    /// The network slot of its VM (isolated mode) while running.
    pub net_slot: Option<u32>,
    /// Why it failed.
    pub error: Option<String>,
    /// The snapshot node its state descends from (for a paused sandbox: the node holding it).
    pub snapshot_id: Option<String>,
    /// Pause rather than kill at the deadline.
    pub auto_pause: bool,
    /// Its egress rules (whether it may reach networks outside its VM, allow and deny lists).
    pub network: viv_net::PolicySpec,
}

/// A snapshot node row.
#[derive(Debug, Clone)]
pub struct SnapshotRow {
    /// Id.
    pub id: String,
    /// The node this one was taken from (its disk layer backs this one's).
    pub parent_id: Option<String>,
    /// The sandbox it was taken of.
    pub sandbox_id: String,
    /// The template the chain started from.
    pub template_id: String,
    /// Why it exists.
    pub kind: SnapshotKind,
    /// A user-given unique name.
    pub name: Option<String>,
    /// vCPUs of the VM.
    pub cpu_count: u32,
    /// Memory of the VM in MiB.
    pub memory_mb: u32,
    /// Bytes on disk (its layer and state).
    pub bytes: u64,
    /// RFC 3339.
    pub created_at: String,
    /// The access token the saved agent expects until it is told a new one.
    pub guest_token: Option<String>,
    /// The network mode it was saved under (`None`: saved before this was recorded).
    pub network: Option<String>,
    /// How it keeps the guest's memory (`whole`, `diff` or `none`), as its node last recorded
    /// (`None`: saved before this was recorded).
    pub memory: Option<String>,
}

/// A template built from a spec.
#[derive(Debug, Clone)]
pub struct TemplateRow {
    /// Name (and id).
    pub name: String,
    /// What it was built `FROM`.
    pub from: String,
    /// Its final disk layer.
    pub layer: String,
    /// Environment, working directory and user its sandboxes inherit.
    pub config: viv_template::ImageConfig,
    /// The start command.
    pub start: Option<viv_template::Command>,
    /// The ready probe.
    pub ready: Option<viv_template::Ready>,
    /// Default vCPUs.
    pub cpu_count: u32,
    /// Default memory in MiB.
    pub memory_mb: u32,
    /// The spec it was built from.
    pub spec: String,
    /// Keys of the layers it keeps alive (its chain, and older chains still in use).
    pub layers: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// How long the build took.
    pub build_ms: u64,
}

/// Why a snapshot node exists; decides when it is collected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotKind {
    /// Holds a paused sandbox; collected once nothing uses it.
    Pause,
    /// Taken to fork a sandbox; collected once nothing uses it.
    Fork,
    /// Asked for by a user; kept until deleted.
    Snapshot,
}

impl SnapshotKind {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Fork => "fork",
            Self::Snapshot => "snapshot",
        }
    }

    fn parse(s: &str) -> Self {
        match s {
            "pause" => Self::Pause,
            "fork" => Self::Fork,
            _ => Self::Snapshot,
        }
    }
}

/// The database.
pub struct Store {
    db: Db,
    /// The PostgreSQL connection string (never logged: it may hold a password).
    postgres_url: Option<String>,
    /// The node whose server this store belongs to ([`Store::set_node`]).
    node: std::sync::OnceLock<String>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the connection string: it may hold a password.
        f.debug_struct("Store")
            .field("engine", &self.engine())
            .finish_non_exhaustive()
    }
}

/// Refuses a database that newer migrations than this binary's have run on.
fn check_version(found: usize, known: usize) -> Result<(), StoreError> {
    if found > known {
        return Err(StoreError::TooNew { found, known });
    }
    Ok(())
}

/// SHA-256 of an API key, hex. Keys are 160 random bits, so a fast hash is enough to make a
/// leaked database useless for authentication.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Now, RFC 3339 with seconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
}

/// A snapshot id or name without E2B's `:default` tag (ids and names never hold a `:`).
pub fn untagged(id_or_name: &str) -> &str {
    id_or_name.strip_suffix(":default").unwrap_or(id_or_name)
}

/// Now in RFC 3339 with milliseconds (sandbox start times, which order lists).
pub fn now_rfc3339_ms() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

impl Store {
    /// Opens (creating) the SQLite database at `path` and applies pending migrations.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = rusqlite::Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "busy_timeout", 5000)?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        check_version(version, MIGRATIONS.len())?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        Ok(Self {
            db: Db::Sqlite(Mutex::new(conn)),
            postgres_url: None,
            node: std::sync::OnceLock::new(),
        })
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://USER@HOST/DB` or a
    /// `host=… dbname=…` string) and applies pending migrations.
    pub fn connect_postgres(url: &str) -> Result<Self, StoreError> {
        let store = Self {
            db: db::postgres(url)?,
            postgres_url: Some(url.to_owned()),
            node: std::sync::OnceLock::new(),
        };
        store.db.transaction(|tx| {
            tx.execute("SELECT pg_advisory_xact_lock(?1)", params![MIGRATION_LOCK])?;
            tx.batch("CREATE TABLE IF NOT EXISTS viv_schema (version BIGINT NOT NULL)")?;
            let version = tx
                .query_row("SELECT version FROM viv_schema", params![], |r| r.get::<i64>(0))?
                .unwrap_or(0);
            let version = usize::try_from(version).unwrap_or(usize::MAX);
            check_version(version, POSTGRES_MIGRATIONS.len())?;
            for sql in POSTGRES_MIGRATIONS.iter().skip(version) {
                tx.batch(sql)?;
            }
            tx.execute("DELETE FROM viv_schema", params![])?;
            tx.execute(
                "INSERT INTO viv_schema (version) VALUES (?1)",
                params![POSTGRES_MIGRATIONS.len()],
            )?;
            Ok(())
        })?;
        Ok(store)
    }

    /// The PostgreSQL connection string, when the state is there.
    pub fn postgres_url(&self) -> Option<&str> {
        self.postgres_url.as_deref()
    }

    /// Which engine holds the state: `sqlite` or `postgres`.
    pub fn engine(&self) -> &'static str {
        match self.db {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres { .. } => "postgres",
        }
    }

    fn conn(&self) -> db::Conn<'_> {
        self.db.lock()
    }

    /// Records a new key (given in clear; only its hash is stored).
    pub fn insert_key(&self, id: &str, name: &str, key: &str) -> Result<ApiKeyInfo, StoreError> {
        let info = ApiKeyInfo {
            id: id.to_owned(),
            name: name.to_owned(),
            prefix: key.chars().take(10).collect(),
            created_at: now_rfc3339(),
        };
        self.conn().execute(
            "INSERT INTO api_keys (id, name, prefix, key_sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![info.id, info.name, info.prefix, hash_key(key), info.created_at],
        )?;
        Ok(info)
    }

    /// Whether a key is valid (exists and is not revoked).
    pub fn key_is_valid(&self, key: &str) -> Result<bool, StoreError> {
        let found: Option<i64> = self.conn().query_row(
            "SELECT 1 FROM api_keys WHERE key_sha256 = ?1 AND revoked_at IS NULL",
            params![hash_key(key)],
            |r| r.get(0),
        )?;
        Ok(found.is_some())
    }

    /// Active keys.
    pub fn list_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let mut conn = self.conn();
        conn.query_map(
            "SELECT id, name, prefix, created_at FROM api_keys WHERE revoked_at IS NULL ORDER BY created_at, id",
            params![],
            |r| {
                Ok(ApiKeyInfo {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    prefix: r.get(2)?,
                    created_at: r.get(3)?,
                })
            },
        )
    }

    /// Revokes a key by id or prefix; returns whether one was revoked.
    pub fn revoke_key(&self, id: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE api_keys SET revoked_at = ?2 WHERE (id = ?1 OR prefix = ?1) AND revoked_at IS NULL",
            params![id, now_rfc3339()],
        )?;
        Ok(n > 0)
    }

    /// Inserts or replaces a sandbox row.
    pub fn put_sandbox(&self, row: &SandboxRow) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO sandboxes (id, template_id, state, started_at, end_at_ms, cpu_count, memory_mb, metadata, access_token, vmm_pid, error,
              snapshot_id, auto_pause, internet, network, vmm_identity, net_slot, node_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18) ON CONFLICT (id) DO UPDATE SET node_id = COALESCE(excluded.node_id, sandboxes.node_id), template_id = excluded.template_id, state = excluded.state, started_at = excluded.started_at, end_at_ms = excluded.end_at_ms, cpu_count = excluded.cpu_count, memory_mb = excluded.memory_mb, metadata = excluded.metadata, access_token = excluded.access_token, vmm_pid = excluded.vmm_pid, error = excluded.error, snapshot_id = excluded.snapshot_id, auto_pause = excluded.auto_pause, internet = excluded.internet, network = excluded.network, vmm_identity = excluded.vmm_identity, net_slot = excluded.net_slot",
            params![
                row.id,
                row.template_id,
                row.state.as_str(),
                row.started_at,
                row.end_at_ms,
                row.cpu_count,
                row.memory_mb,
                serde_json::to_string(&row.metadata).expect("metadata serializes"),
                row.access_token,
                row.vmm.map(|v| v.pid),
                row.error,
                row.snapshot_id,
                row.auto_pause,
                row.network.internet,
                (!row.network.is_plain()).then(|| serde_json::to_string(&row.network).expect("rules serialize")),
                row.vmm.map(|v| v.to_string()),
                row.net_slot,
                self.node_id(),
            ],
        )?;
        Ok(())
    }

    /// Marks a sandbox failed with a reason.
    pub fn fail_sandbox(&self, id: &str, reason: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET state = 'failed', error = ?2, vmm_pid = NULL, vmm_identity = NULL, net_slot = NULL WHERE id = ?1",
            params![id, reason],
        )?;
        Ok(())
    }

    /// Changes a sandbox's deadline.
    pub fn set_end(&self, id: &str, end_at_ms: i64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET end_at_ms = ?2 WHERE id = ?1",
            params![id, end_at_ms],
        )?;
        Ok(())
    }

    /// Records the node a sandbox's state now descends from.
    pub fn set_sandbox_snapshot(&self, id: &str, snapshot_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET snapshot_id = ?2 WHERE id = ?1",
            params![id, snapshot_id],
        )?;
        Ok(())
    }

    /// Deletes a sandbox row, with its traffic token and owner (SQLite's triggers did this before
    /// PostgreSQL, whose schema has no triggers; both engines run the same statements now).
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
            tx.execute("DELETE FROM sandbox_traffic WHERE sandbox_id = ?1", params![id])?;
            tx.execute("DELETE FROM sandbox_owners WHERE sandbox_id = ?1", params![id])?;
            tx.execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
            Ok(())
        })
    }

    /// One sandbox.
    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, StoreError> {
        let mut conn = self.conn();
        conn.query_row(&format!("{SELECT_SANDBOX} WHERE id = ?1"), params![id], row_to_sandbox)
    }

    /// Records a new node and points the sandbox it was taken of at it, in one transaction:
    /// the collector, which deletes `pause` and `fork` nodes nothing uses, must never see a new
    /// node before its sandbox uses it (it did, between two statements, under concurrent kills).
    pub fn put_snapshot(&self, row: &SnapshotRow) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
            tx.execute(
                "INSERT INTO snapshots
             (id, parent_id, sandbox_id, template_id, kind, name, cpu_count, memory_mb, bytes, created_at, guest_token,
              network, node_id, memory)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                params![
                    row.id,
                    row.parent_id,
                    row.sandbox_id,
                    row.template_id,
                    row.kind.as_str(),
                    row.name,
                    row.cpu_count,
                    row.memory_mb,
                    row.bytes as i64,
                    row.created_at,
                    row.guest_token,
                    row.network,
                    self.node_id(),
                    row.memory,
                ],
            )?;
            tx.execute(
                "UPDATE sandboxes SET snapshot_id = ?2 WHERE id = ?1",
                params![row.sandbox_id, row.id],
            )?;
            Ok(())
        })
    }

    /// Records a node's memory rewritten as a diff, and its new size on disk.
    pub fn set_snapshot_diffed(&self, id: &str, bytes: u64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE snapshots SET bytes = ?2, memory = 'diff' WHERE id = ?1",
            params![id, bytes as i64],
        )?;
        Ok(())
    }

    /// One snapshot node, by id or name.
    pub fn snapshot(&self, id_or_name: &str) -> Result<Option<SnapshotRow>, StoreError> {
        let id_or_name = untagged(id_or_name);
        let mut conn = self.conn();
        conn.query_row(
            &format!("{SELECT_SNAPSHOT} WHERE id = ?1 OR name = ?1"),
            params![id_or_name],
            row_to_snapshot,
        )
    }

    /// All snapshot nodes, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRow>, StoreError> {
        let mut conn = self.conn();
        conn.query_map(
            &format!("{SELECT_SNAPSHOT} ORDER BY created_at, id"),
            params![],
            row_to_snapshot,
        )
    }

    /// What depends on a node: child nodes and sandboxes (running or paused) descending from it.
    pub fn snapshot_users(&self, id: &str) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let mut conn = self.conn();
        let children = conn.query_map(
            "SELECT id FROM snapshots WHERE parent_id = ?1 ORDER BY id",
            params![id],
            |r| r.get(0),
        )?;
        let sandboxes = conn.query_map(
            "SELECT id FROM sandboxes WHERE snapshot_id = ?1 AND state != 'failed' ORDER BY id",
            params![id],
            |r| r.get(0),
        )?;
        Ok((children, sandboxes))
    }

    /// Gives node `id` another parent and its new size on disk (a superseded pause folded into it).
    pub fn reparent_snapshot(&self, id: &str, parent_id: Option<&str>, bytes: u64) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE snapshots SET parent_id = ?2, bytes = ?3 WHERE id = ?1",
            params![id, parent_id, bytes as i64],
        )?;
        Ok(())
    }

    /// Deletes a node row (and clears references of failed sandboxes to it).
    /// Turns a named snapshot that sandboxes still need into an unnamed `fork` node, which the
    /// collector deletes once nothing needs it (a user's delete of a snapshot in use).
    pub fn demote_snapshot(&self, id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE snapshots SET kind = 'fork', name = NULL WHERE id = ?1",
            params![id],
        )?;
        Ok(())
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        conn.execute(
            "UPDATE sandboxes SET snapshot_id = NULL WHERE snapshot_id = ?1",
            params![id],
        )?;
        conn.execute("DELETE FROM snapshots WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Records (or replaces) a template.
    pub fn put_template(&self, row: &TemplateRow) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO templates (name, from_name, layer, config, start_cmd, ready_cmd, cpu_count, memory_mb, spec, layers, created_at, build_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) ON CONFLICT (name) DO UPDATE SET from_name = excluded.from_name, layer = excluded.layer, config = excluded.config, start_cmd = excluded.start_cmd, ready_cmd = excluded.ready_cmd, cpu_count = excluded.cpu_count, memory_mb = excluded.memory_mb, spec = excluded.spec, layers = excluded.layers, created_at = excluded.created_at, build_ms = excluded.build_ms",
            params![
                row.name,
                row.from,
                row.layer,
                json(&row.config),
                row.start.as_ref().map(json),
                row.ready.as_ref().map(json),
                row.cpu_count,
                row.memory_mb,
                row.spec,
                json(&row.layers),
                row.created_at,
                row.build_ms as i64,
            ],
        )?;
        Ok(())
    }

    /// One template by name.
    pub fn template(&self, name: &str) -> Result<Option<TemplateRow>, StoreError> {
        let mut conn = self.conn();
        conn.query_row(
            &format!("{SELECT_TEMPLATE} WHERE name = ?1"),
            params![name],
            row_to_template,
        )
    }

    /// All templates, by name.
    pub fn templates(&self) -> Result<Vec<TemplateRow>, StoreError> {
        let mut conn = self.conn();
        conn.query_map(&format!("{SELECT_TEMPLATE} ORDER BY name"), params![], row_to_template)
    }

    /// Deletes a template row (and the build it records).
    pub fn delete_template(&self, name: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        conn.execute("DELETE FROM templates WHERE name = ?1", params![name])?;
        conn.execute("DELETE FROM template_builds WHERE name = ?1", params![name])?;
        Ok(())
    }

    /// Records which build made template row `name`.
    pub fn put_template_build(&self, name: &str, build_id: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO template_builds (name, build_id) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET build_id = excluded.build_id",
            params![name, build_id],
        )?;
        Ok(())
    }

    /// The build that made template row `name`, if recorded.
    pub fn template_build(&self, name: &str) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn();
        conn.query_row(
            "SELECT build_id FROM template_builds WHERE name = ?1",
            params![name],
            |r| r.get(0),
        )
    }

    /// All sandboxes, oldest first.
    pub fn sandboxes(&self) -> Result<Vec<SandboxRow>, StoreError> {
        let mut conn = self.conn();
        conn.query_map(
            &format!("{SELECT_SANDBOX} ORDER BY started_at, id"),
            params![],
            row_to_sandbox,
        )
    }
}

const SELECT_SANDBOX: &str = "SELECT id, template_id, state, started_at, end_at_ms, cpu_count, memory_mb, metadata, \
                              access_token, vmm_pid, error, snapshot_id, auto_pause, internet, network, \
                              vmm_identity, net_slot FROM sandboxes";

fn row_to_sandbox(r: &Row) -> Result<SandboxRow, StoreError> {
    let state: String = r.get(2)?;
    let metadata: String = r.get(7)?;
    Ok(SandboxRow {
        id: r.get(0)?,
        template_id: r.get(1)?,
        state: SandboxState::parse(&state).unwrap_or(SandboxState::Failed),
        started_at: r.get(3)?,
        end_at_ms: r.get(4)?,
        cpu_count: r.get(5)?,
        memory_mb: r.get(6)?,
        metadata: serde_json::from_str(&metadata).unwrap_or_default(),
        access_token: r.get(8)?,
        vmm: r
            .get::<Option<String>>(15)?
            .and_then(|v| v.parse::<viv_vmm::ProcessIdentity>().ok()),
        net_slot: r.get(16)?,
        error: r.get(10)?,
        snapshot_id: r.get(11)?,
        auto_pause: r.get(12)?,
        network: match r.get::<Option<String>>(14)?.and_then(|j| serde_json::from_str(&j).ok()) {
            Some(rules) => rules,
            None => viv_net::PolicySpec {
                internet: r.get(13)?,
                ..viv_net::PolicySpec::default()
            },
        },
    })
}

const SELECT_TEMPLATE: &str = "SELECT name, from_name, layer, config, start_cmd, ready_cmd, cpu_count, memory_mb, \
                               spec, layers, created_at, build_ms FROM templates";

fn row_to_template(r: &Row) -> Result<TemplateRow, StoreError> {
    let parse = |i: usize| -> Result<Option<String>, StoreError> { r.get(i) };
    Ok(TemplateRow {
        name: r.get(0)?,
        from: r.get(1)?,
        layer: r.get(2)?,
        config: parse(3)?
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        start: parse(4)?.and_then(|t| serde_json::from_str(&t).ok()),
        ready: parse(5)?.and_then(|t| serde_json::from_str(&t).ok()),
        cpu_count: r.get(6)?,
        memory_mb: r.get(7)?,
        spec: r.get(8)?,
        layers: parse(9)?
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        created_at: r.get(10)?,
        build_ms: r.get::<i64>(11)?.max(0) as u64,
    })
}

/// A value as the text of a JSON column.
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("column values serialize")
}

const SELECT_SNAPSHOT: &str =
    "SELECT id, parent_id, sandbox_id, template_id, kind, name, cpu_count, memory_mb, bytes, \
                               created_at, guest_token, network, memory FROM snapshots";

fn row_to_snapshot(r: &Row) -> Result<SnapshotRow, StoreError> {
    let kind: String = r.get(4)?;
    Ok(SnapshotRow {
        id: r.get(0)?,
        parent_id: r.get(1)?,
        sandbox_id: r.get(2)?,
        template_id: r.get(3)?,
        kind: SnapshotKind::parse(&kind),
        name: r.get(5)?,
        cpu_count: r.get(6)?,
        memory_mb: r.get(7)?,
        bytes: r.get::<i64>(8)?.max(0) as u64,
        created_at: r.get(9)?,
        guest_token: r.get(10)?,
        network: r.get(11)?,
        memory: r.get(12)?,
    })
}
