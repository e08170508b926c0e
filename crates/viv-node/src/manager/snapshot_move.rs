//! Paused sandboxes across the nodes of a cluster: a paused sandbox resumes on another node than
//! the one that paused it (its node is draining, full, or it was drained off it), its snapshot
//! node's files moving with it over the node API.
//!
//! What moves is one snapshot node: its disk made whole down to the template's layer (the
//! snapshots above it in the tree and the pausing node's template snapshot disk folded in, by a
//! safe `qemu-img rebase` of a copy), and its saved state (the whole guest memory) or its
//! disk-only marker, and the key of the agent channel of the saved guest (the giving node's:
//! the first connection after the restore uses it, then the agent is given the new node's). The
//! receiving node fetches the template's layers it lacks as a template
//! start does (`layer_fetch.rs`), so the moved disk rests on its own copy of the same layer. The
//! snapshot's parents stay where they are: the moved disk needs none of them.
//!
//! Invariants:
//! - the receiving node builds the node directory under `<id>.building` and renames it into
//!   place only complete; then one store transaction moves the sandbox and the snapshot row to
//!   it, conditional on both still being where they were, so of two nodes adopting one sandbox
//!   at once exactly one wins and the other removes its copy;
//! - the giving node removes its copy only once the rows name another node (the receiver asks
//!   it to; a copy it missed is removed at its next start, which keeps only its own rows' files);
//! - a snapshot whose memory is kept as a diff chain on a base of its node (memory diffs are off
//!   by default) moves as one whole state composed of its chain and base: the receiving node
//!   needs none of the giving node's bases, and keeps the state whole;
//! - export copies live in `snapshots/.export-*` directories, removed once opened (the answer
//!   streams from the open file) and, after a crash, at start with other directories that have
//!   no row.

use std::path::{Path, PathBuf};

use viv_api::nodes::NodeState;
use viv_api::SandboxState;

use super::layer_fetch::{download, peer_client};
use super::{random_id, Manager, CLUSTER_SECRET_HEADER};
use crate::error::ApiError;
use crate::store::SandboxRow;

/// The header of a snapshot disk's export saying how the snapshot keeps memory: `whole` (its
/// `state` follows) or `none` (disk only).
pub const SNAPSHOT_MEMORY_HEADER: &str = "x-viv-snapshot-memory";

/// The header of a snapshot disk's export carrying the agent channel key of the saved guest
/// (the giving node's), which the receiving node keeps in the node directory as
/// [`NODE_CHANNEL_KEY`] for the first connection after a restore.
pub const SNAPSHOT_CHANNEL_KEY_HEADER: &str = "x-viv-snapshot-channel-key";

/// The file of a node directory holding the channel key of its saved guest, when that is not
/// this server's (the node came from another one).
const NODE_CHANNEL_KEY: &str = "channel.key";

/// Longest backing chain followed (a tree deeper than this is refused, not walked forever).
const MAX_CHAIN: usize = 4096;

/// A file of a snapshot node, opened for the node API, with its length.
pub struct ExportedFile {
    /// The open file (its name may already be gone).
    pub file: tokio::fs::File,
    /// Its length in bytes.
    pub len: u64,
}

impl Manager {
    /// The disk of snapshot node `id` made whole down to its template's layer, for another node
    /// to adopt, how the node keeps memory (`whole` or `none`) and its guest's channel key.
    pub async fn export_snapshot_disk(&self, id: &str) -> Result<(ExportedFile, &'static str, String), ApiError> {
        let memory = self.movable_memory(id)?;
        let key = self.node_channel_key(&self.node_dir(id));
        let disk = self.node_dir(id).join("disk.qcow2");
        let layer = self.template_layer_under(&disk)?;
        let work = self
            .config
            .data_dir
            .join("snapshots")
            .join(format!(".export-{}", random_id(12)));
        std::fs::create_dir_all(&work).map_err(|e| ApiError::Internal(format!("creating {}: {e}", work.display())))?;
        let result = async {
            let copy = work.join("disk.qcow2");
            tokio::fs::copy(&disk, &copy)
                .await
                .map_err(|e| ApiError::Internal(format!("copying {}: {e}", disk.display())))?;
            if let Some(layer) = &layer {
                // A safe rebase: whatever the chain between the disk and the layer holds is
                // copied into the disk, so it rests on the layer alone.
                let args: Vec<std::ffi::OsString> = vec![
                    "rebase".into(),
                    "-q".into(),
                    "-f".into(),
                    "qcow2".into(),
                    "-F".into(),
                    "qcow2".into(),
                    "-b".into(),
                    layer.into(),
                    copy.clone().into(),
                ];
                viv_storage::qemu_img::run(&args)
                    .await
                    .map_err(|e| ApiError::Internal(format!("folding snapshot {id}'s disk chain: {e}")))?;
            }
            ExportedFile::open(&copy).await
        }
        .await;
        let _ = std::fs::remove_dir_all(&work);
        Ok((result?, memory, key))
    }

    /// The agent channel key the guest saved in node directory `dir` has: its own file's, or
    /// this server's.
    pub(super) fn node_channel_key(&self, dir: &Path) -> String {
        std::fs::read_to_string(dir.join(NODE_CHANNEL_KEY))
            .ok()
            .map(|k| k.trim().to_owned())
            .filter(|k| valid_channel_key(k))
            .unwrap_or_else(|| self.channel_key.clone())
    }

    /// The saved state (guest memory) of snapshot node `id`, for another node to adopt: its
    /// whole state, or, when it keeps a diff chain on a base of this node, the chain and the
    /// base composed into one whole state (written to an export copy, which goes once opened).
    pub async fn export_snapshot_state(&self, id: &str) -> Result<ExportedFile, ApiError> {
        if self.movable_memory(id)? != "whole" {
            return Err(ApiError::NotFound(format!("snapshot {id} keeps no memory")));
        }
        let (base, chain) = match self.node_memory(&self.node_dir(id)).await? {
            super::memory_chain::NodeMemory::Whole { file, .. } => {
                let failed = |e: std::io::Error| ApiError::Internal(format!("reading snapshot {id}'s state: {e}"));
                let file = file.try_clone().map_err(failed)?;
                let len = file.metadata().map_err(failed)?.len();
                return Ok(ExportedFile {
                    file: tokio::fs::File::from_std(file),
                    len,
                });
            }
            super::memory_chain::NodeMemory::Chain { base, chain } => (base, chain),
        };
        let work = self
            .config
            .data_dir
            .join("snapshots")
            .join(format!(".export-{}", random_id(12)));
        std::fs::create_dir_all(&work).map_err(|e| ApiError::Internal(format!("creating {}: {e}", work.display())))?;
        let state = work.join("state");
        let written = {
            let state = state.clone();
            tokio::task::spawn_blocking(move || -> Result<(), String> {
                use std::os::unix::fs::OpenOptionsExt as _;
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&state)
                    .map_err(|e| format!("creating {}: {e}", state.display()))?;
                chain.compose_whole(&base, file).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
        };
        let result = match written {
            Ok(()) => ExportedFile::open(&state).await,
            Err(e) => Err(ApiError::Internal(format!(
                "composing snapshot {id}'s memory chain into one state: {e}"
            ))),
        };
        let _ = std::fs::remove_dir_all(&work);
        if result.is_ok() {
            tracing::info!(snapshot = %id, "memory diff chain composed into a whole state for another node");
        }
        result
    }

    /// Removes this node's copy of snapshot node `id`, which another node adopted (its row no
    /// longer names this node).
    pub fn drop_moved_snapshot(&self, id: &str) -> Result<(), ApiError> {
        if !super::layer_fetch::valid_layer_key(id) {
            return Err(ApiError::BadRequest(format!("'{id}' is not a snapshot id")));
        }
        if self.store.snapshot_node(id)?.flatten().as_deref() == Some(self.node_id())
            || self.store.snapshot_replicas(id)?.iter().any(|n| n == self.node_id())
        {
            return Err(ApiError::Conflict(format!(
                "snapshot {id} is still this node's or a copy it keeps; it is dropped only once no row names this node"
            )));
        }
        let dir = self.node_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| ApiError::Internal(format!("removing {}: {e}", dir.display())))?;
            tracing::info!(snapshot = %id, "removed this node's copy of a snapshot held elsewhere");
        }
        Ok(())
    }

    /// How snapshot node `id`, whose files are on this node, keeps memory, when it can move.
    fn movable_memory(&self, id: &str) -> Result<&'static str, ApiError> {
        if !super::layer_fetch::valid_layer_key(id) || self.store.snapshot(id)?.is_none() {
            return Err(ApiError::NotFound(format!("snapshot '{id}' not found")));
        }
        if !self.node_dir(id).join("disk.qcow2").is_file() {
            return Err(ApiError::NotFound(format!(
                "snapshot {id}'s files are not on this node"
            )));
        }
        match self.node_memory_kind(id) {
            // A diff chain moves composed into a whole state (`export_snapshot_state`).
            "diff" | "whole" => Ok("whole"),
            _ if self.node_dir(id).join(super::lifecycle::DISK_ONLY).exists() => Ok("none"),
            _ => Err(ApiError::Conflict(format!(
                "snapshot {id} holds a disk layer but no saved state (its save failed)"
            ))),
        }
    }

    /// The first file under `disk` in its backing chain that is neither a snapshot node's nor
    /// a template snapshot's disk: the template's layer (or base image) the chain rests on.
    fn template_layer_under(&self, disk: &Path) -> Result<Option<PathBuf>, ApiError> {
        let snapshots = self.config.data_dir.join("snapshots");
        let templates = self.config.data_dir.join("templates");
        let mut path = disk.to_path_buf();
        for _ in 0..MAX_CHAIN {
            let header = viv_vmm::qcow2::header(&path)
                .map_err(|e| ApiError::Internal(format!("reading {}: {e}", path.display())))?;
            let Some(backing) = header.backing_file else {
                return Ok(None);
            };
            let backing = path.parent().unwrap_or(Path::new("/")).join(backing);
            if !(backing.starts_with(&snapshots) || backing.starts_with(&templates)) {
                return Ok(Some(backing));
            }
            path = backing;
        }
        Err(ApiError::Conflict(format!(
            "the disk chain of {} is longer than {MAX_CHAIN} layers",
            disk.display()
        )))
    }

    /// This node's id in the cluster (empty before it joins one).
    pub(super) fn node_id(&self) -> &str {
        self.cluster_link.get().map(|l| l.node_id.as_str()).unwrap_or_default()
    }

    /// Adopts paused sandbox `id` from the node holding it (drain moves sandboxes this way):
    /// after it, the sandbox is paused on this node.
    pub async fn adopt_paused_sandbox(&self, id: &str) -> Result<(), ApiError> {
        let gate = self.resume_gates.gate(id);
        let _resuming = gate.lock().await;
        let row = self.store.sandbox(id)?.ok_or_else(|| ApiError::sandbox_not_found(id))?;
        if row.state != SandboxState::Paused {
            return Err(ApiError::Conflict(format!(
                "sandbox '{id}' is {}, not paused: only a paused sandbox moves",
                row.state.as_str()
            )));
        }
        self.adopt_paused(&row).await
    }

    /// Makes the snapshot node of paused sandbox `row` this node's, when another node holds it:
    /// takes its files from this node's copy, the holding node or (that one down) a node with a
    /// copy, then moves the rows (see the module's invariants). Runs under the sandbox's resume
    /// gate.
    pub(super) async fn adopt_paused(&self, row: &SandboxRow) -> Result<(), ApiError> {
        let Some(link) = self.cluster_link.get() else {
            return Ok(());
        };
        let Some(snapshot) = row.snapshot_id.as_deref() else {
            return Ok(());
        };
        let Some(owner) = self.store.snapshot_node(snapshot)?.flatten() else {
            return Ok(());
        };
        if owner == link.node_id {
            return Ok(());
        }
        let id = &row.id;
        let started = std::time::Instant::now();
        let replicas = self.store.snapshot_replicas(snapshot)?;
        let dir = self.node_dir(snapshot);
        let has_copy = replicas.contains(&link.node_id) && dir.join("disk.qcow2").is_file();
        let holder = self.store.node(&owner)?.filter(|n| n.state != NodeState::Down);
        let from = if has_copy {
            None
        } else if let Some(holder) = holder.clone() {
            Some(holder)
        } else {
            let mut up = None;
            for node in &replicas {
                if let Some(node) = self.store.node(node)?.filter(|n| n.state != NodeState::Down) {
                    up = Some(node);
                    break;
                }
            }
            Some(up.ok_or_else(|| {
                ApiError::Unavailable(format!(
                    "paused sandbox '{id}' is held by node {owner}, which is down, and no node that is up has a \
                     copy of it (servers started with --pause-replicas keep copies); it resumes once that node is back"
                ))
            })?)
        };
        if let Some(from) = &from {
            self.fetch_snapshot(link, from, snapshot, &row.template_id).await?;
        }
        if !self.store.move_paused_sandbox(id, snapshot, &owner, &link.node_id)? {
            if !has_copy {
                let _ = std::fs::remove_dir_all(&dir);
            }
            return Err(ApiError::Conflict(format!(
                "sandbox '{id}' was resumed or moved by another node meanwhile; try again"
            )));
        }
        // The holding node and the other copies' nodes drop theirs (a node that is down drops
        // its copy at its next start).
        self.store.delete_snapshot_replicas(snapshot)?;
        let others = holder.into_iter().map(|n| n.id).chain(replicas);
        self.drop_copies_on(others, snapshot);
        self.metrics.sandboxes_moved.inc();
        let source = from.map(|n| n.name).unwrap_or_else(|| "this node's copy".into());
        tracing::info!(sandbox = %id, snapshot, from = %source, ms = started.elapsed().as_millis() as u64, "paused sandbox moved to this node");
        Ok(())
    }

    /// Fetches snapshot node `snapshot` (of template `template`) from node `from` into this
    /// node's `snapshots/`, complete or not at all.
    pub(super) async fn fetch_snapshot(
        &self,
        link: &super::ClusterLink,
        from: &crate::store::NodeRow,
        snapshot: &str,
        template: &str,
    ) -> Result<(), ApiError> {
        let dir = self.node_dir(snapshot);
        let building = dir.with_extension("building");
        let _ = std::fs::remove_dir_all(&building);
        std::fs::create_dir_all(&building)
            .map_err(|e| ApiError::Internal(format!("creating {}: {e}", building.display())))?;
        let client = peer_client()?;
        let base = from.internal_url(&format!("snapshots/{snapshot}"));
        let fetched = async {
            let failed =
                |what: &str, err: String| ApiError::Unavailable(format!("{what} from node {}: {err}", from.name));
            let disk = building.join("disk.qcow2");
            let headers = download(&client, link, &format!("{base}/disk"), &disk)
                .await
                .map_err(|e| failed("fetching the sandbox's disk", e))?;
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let memory = header(SNAPSHOT_MEMORY_HEADER);
            let key = header(SNAPSHOT_CHANNEL_KEY_HEADER);
            if !valid_channel_key(&key) {
                return Err(failed(
                    "the sandbox's snapshot",
                    "no valid channel key came with it".into(),
                ));
            }
            write_private(&building.join(NODE_CHANNEL_KEY), key.as_bytes())?;
            let layer = self.adopt_backing(&disk).map_err(|e| failed("the sandbox's disk", e))?;
            if let Some(key) = layer {
                self.fetch_template_layers(template, &self.layer_path(&key)).await?;
            }
            super::snapshots::seal(&disk)?;
            match memory.as_str() {
                "whole" => {
                    download(&client, link, &format!("{base}/state"), &building.join("state"))
                        .await
                        .map_err(|e| failed("fetching the sandbox's memory", e))?;
                }
                "none" => std::fs::write(building.join(super::lifecycle::DISK_ONLY), b"")
                    .map_err(|e| ApiError::Internal(format!("marking {}: {e}", building.display())))?,
                other => {
                    return Err(failed(
                        "the sandbox's snapshot",
                        format!("unknown memory kind '{other}'"),
                    ))
                }
            }
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&building, &dir)
                .map_err(|e| ApiError::Internal(format!("placing snapshot {snapshot}: {e}")))?;
            Ok(())
        }
        .await;
        if fetched.is_err() {
            let _ = std::fs::remove_dir_all(&building);
        }
        fetched
    }

    /// Asks nodes `nodes` (ids) to drop their copies of snapshot node `snapshot`, which no
    /// longer names them, in the background; a node that is down or does not answer drops its
    /// copy at its next start.
    pub(super) fn drop_copies_on(&self, nodes: impl Iterator<Item = String>, snapshot: &str) {
        let Some(link) = self.cluster_link.get().cloned() else {
            return;
        };
        let targets: Vec<_> = nodes
            .filter(|n| *n != link.node_id)
            .filter_map(|n| self.store.node(&n).ok().flatten())
            .filter(|n| n.state != NodeState::Down)
            .collect();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if targets.is_empty() {
            return;
        }
        let snapshot = snapshot.to_owned();
        runtime.spawn(async move {
            let Ok(client) = peer_client() else {
                return;
            };
            for node in targets {
                let url = node.internal_url(&format!("snapshots/{snapshot}"));
                let dropped = client
                    .delete(&url)
                    .header(CLUSTER_SECRET_HEADER, &link.secret)
                    .send()
                    .await
                    .and_then(|r| r.error_for_status());
                if let Err(err) = dropped {
                    tracing::warn!(snapshot, node = %node.name, %err, "a node did not drop its copy of a snapshot; it does at its next start");
                }
            }
        });
    }

    /// Asks node `to` to adopt paused sandbox `id` from this one (a drain).
    pub async fn hand_over_paused(&self, to: &crate::store::NodeRow, id: &str) -> Result<(), ApiError> {
        let url = &to.url;
        let link = self
            .cluster_link
            .get()
            .ok_or_else(|| ApiError::Internal("this server is not in a cluster".into()))?;
        let response = peer_client()?
            .post(to.internal_url(&format!("sandboxes/{id}/adopt")))
            .header(CLUSTER_SECRET_HEADER, &link.secret)
            .send()
            .await
            .map_err(|e| ApiError::Unavailable(format!("asking {url} to take sandbox '{id}': {e}")))?;
        if response.status().is_success() {
            return Ok(());
        }
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<viv_api::ErrorBody>(&body)
            .map(|e| e.message)
            .unwrap_or(body);
        Err(ApiError::Unavailable(format!(
            "{url} did not take sandbox '{id}': {status} {message}"
        )))
    }
}

/// Whether `key` can be an agent channel key (32 letters and digits).
fn valid_channel_key(key: &str) -> bool {
    key.len() == 32 && key.chars().all(|c| c.is_ascii_alphanumeric())
}

/// Writes a file only root reads.
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ApiError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|e| ApiError::Internal(format!("writing {}: {e}", path.display())))
}

impl ExportedFile {
    /// Opens `path` for an answer of the node API.
    pub async fn open(path: &Path) -> Result<Self, ApiError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ApiError::Internal(format!("opening {}: {e}", path.display())))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| ApiError::Internal(format!("reading {}: {e}", path.display())))?
            .len();
        Ok(Self { file, len })
    }
}
