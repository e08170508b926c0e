//! Stopped VMs moved between nodes of one cluster (`POST /vms/{id}/migrate` with `node` for a
//! VM that is not running): the target node copies the VM's writable disks and its UEFI
//! variables from the source over the node API, then takes the VM's row over; the source then
//! deletes its copies. A running VM moves live instead (`vm_migrate.rs`).
//!
//! Steps:
//! 1. the source holds the VM's gate for the whole move (no start, edit or delete beside it);
//! 2. it asks the target to adopt the VM (`POST /internal/vms/{id}/adopt`);
//! 3. the target checks that the row names the source and the VM is not active, that its ISOs
//!    and read-only disks are in its own pool and its writable disks' names are free there,
//!    then fetches each writable disk (`GET /internal/vms/{id}/disks/{disk}`, with its SHA-256,
//!    checked as the disk is written through the pool's upload) and the VM's NVRAM, and takes
//!    the row over (`Store::take_over_stopped_vm`, conditional on the row still naming the
//!    source and the VM still inactive);
//! 4. once the target answered, the source deletes its disks and the VM's files.
//!
//! A linked clone is served flattened (its base stays on the source, which keeps serving its
//! other clones); a disk that is the base of linked clones does not move (`check_migratable`).
//!
//! Invariants: until step 3's update the VM is the source's, and any failure deletes what the
//! target made (its disks, its files); after it, the VM is the target's, and the source never
//! touches its row again. A disk the source serves is one of the VM's writable disks, served
//! only while the row names the source and the VM is inactive.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::{Method, StatusCode};
use sha2::Digest as _;
use viv_api::vms::MigrationFigures;

use super::migrate_remote::{remote_error, Remote};
use super::snapshot_move::ExportedFile;
use super::vms::{definition_of, state_of};
use super::Manager;
use crate::error::ApiError;

/// The header carrying a served disk's SHA-256.
pub const DISK_SHA256_HEADER: &str = "x-viv-disk-sha256";

/// Largest NVRAM accepted (OVMF's variable stores are 128 KiB to 4 MiB).
const MAX_NVRAM_BYTES: usize = 64 << 20;

/// Longest a whole move (every disk copied) may take.
const MOVE_TIMEOUT: Duration = Duration::from_secs(4 * 60 * 60);

/// `POST /internal/vms/{id}/adopt` body.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptVm {
    /// The node holding the VM now.
    pub from: String,
}

impl Manager {
    /// Step 1, 2 and 4: moves stopped VM `id` to the node behind `remote` (named `node`).
    pub(super) async fn move_stopped_vm(
        self: &Arc<Self>,
        id: &str,
        remote: &Remote,
        node: &str,
    ) -> Result<MigrationFigures, ApiError> {
        let started = Instant::now();
        let (row, _held) = self.lock_vm(id).await?;
        if state_of(&row)?.is_active() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' started while its move was waiting: move it live, or stop it first",
                row.name
            )));
        }
        self.check_migratable(&row, true).await?;
        let body = serde_json::to_value(AdoptVm {
            from: self.node_id().to_owned(),
        })
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        let (status, answer) = remote
            .call_within(
                MOVE_TIMEOUT,
                Method::POST,
                &format!("/vms/{}/adopt", row.id),
                Some(&body),
            )
            .await?;
        if status != StatusCode::OK {
            return Err(remote_error(status, &answer, "to take the VM"));
        }
        // The VM is the target's now: this node's copies go.
        let def = definition_of(&row.definition)?;
        let writable: Vec<String> = def
            .disks
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| d.disk.clone())
            .collect();
        self.remove_vm_files(&row.id, &writable).await;
        let total_ms = started.elapsed().as_millis() as u64;
        tracing::info!(vm = %row.id, name = %row.name, %node, total_ms, "stopped VM moved to another node");
        Ok(MigrationFigures {
            total_ms,
            disk_copy_ms: total_ms,
            ram_ms: 0,
            downtime_ms: 0,
            ram_bytes: 0,
        })
    }

    /// Writable disk `disk` of VM `id` for the node adopting it, with its SHA-256.
    pub async fn export_vm_disk(&self, id: &str, disk: &str) -> Result<(ExportedFile, String), ApiError> {
        let row = self.movable_row(id)?;
        let def = definition_of(&row.definition)?;
        if !def.disks.iter().any(|d| !d.read_only && d.disk == disk) {
            return Err(ApiError::NotFound(format!(
                "VM '{}' has no writable disk '{disk}'",
                row.name
            )));
        }
        // A linked clone travels flattened: its base stays here.
        let linked = self
            .storage
            .disk_info(disk)
            .await
            .map_err(|e| super::storage::api(e.kind(), e))?
            .backing
            .is_some();
        let download = if linked {
            let export = self.export_disk(disk, "qcow2").await?;
            viv_storage::Download {
                file: export.file,
                len: export.len,
                format: viv_storage::DiskFormat::Qcow2,
            }
        } else {
            self.download_disk(disk).await?
        };
        let file = download.file.into_std().await;
        let (file, sha256) = tokio::task::spawn_blocking(move || -> std::io::Result<(std::fs::File, String)> {
            use std::io::Seek as _;
            let mut file = file;
            let mut hasher = sha2::Sha256::new();
            std::io::copy(&mut file, &mut hasher)?;
            file.rewind()?;
            Ok((file, hex::encode(hasher.finalize())))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("reading disk '{disk}': {e}")))?;
        Ok((
            ExportedFile {
                file: tokio::fs::File::from_std(file),
                len: download.len,
            },
            sha256,
        ))
    }

    /// VM `id`'s UEFI variables for the node adopting it (`None` without any).
    pub fn export_vm_nvram(&self, id: &str) -> Result<Option<Vec<u8>>, ApiError> {
        self.movable_row(id)?;
        match std::fs::read(self.vm_dir(id).join("nvram.fd")) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ApiError::Internal(format!("reading VM '{id}' NVRAM: {e}"))),
        }
    }

    /// The row of VM `id` while this node holds it and it is not active.
    fn movable_row(&self, id: &str) -> Result<crate::store::VmRow, ApiError> {
        let row = self.vm_row(id)?;
        if self.store.vm_node(&row.id)?.flatten().as_deref() != Some(self.node_id()) {
            return Err(ApiError::Conflict(format!("VM '{}' is not on this node", row.name)));
        }
        if state_of(&row)?.is_active() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is active: it moves live",
                row.name
            )));
        }
        Ok(row)
    }

    /// Step 3: adopts stopped VM `id` from node `from`.
    pub async fn adopt_stopped_vm(&self, id: &str, from: &str) -> Result<viv_api::vms::VmInfo, ApiError> {
        let row = self.vm_row(id)?;
        let _gate = self.vm_runtime.gate(&row.id).lock_owned().await;
        self.check_moving_from(&row, from)?;
        if state_of(&row)?.is_active() {
            return Err(ApiError::Conflict(format!(
                "VM '{}' is active: it moves live",
                row.name
            )));
        }
        let def = definition_of(&row.definition)?;
        self.check_shared_media_here(&def, "the target node's").await?;
        let writable: Vec<&str> = def
            .disks
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| d.disk.as_str())
            .collect();
        for disk in &writable {
            if self.storage.disk_info(disk).await.is_ok() {
                return Err(ApiError::Conflict(format!(
                    "a disk named '{disk}' already exists on this node"
                )));
            }
        }
        let source = self
            .store
            .node(from)?
            .ok_or_else(|| ApiError::NotFound(format!("no node '{from}'")))?;
        let link = self
            .cluster_link
            .get()
            .ok_or_else(|| ApiError::Conflict("this server is not part of a cluster".into()))?;
        let client = super::layer_fetch::peer_client()?;
        let mut made = Vec::new();
        let copied = async {
            for disk in &writable {
                let url = source.internal_url(&format!("vms/{}/disks/{disk}", row.id));
                self.fetch_disk(&client, &link.secret, &url, disk).await?;
                made.push(disk.to_string());
            }
            self.fetch_nvram(&client, &link.secret, &source.internal_url(&format!("vms/{}/nvram", row.id)), &row.id)
                .await?;
            if !self.store.take_over_stopped_vm(&row.id, from)? {
                return Err(ApiError::Conflict(format!(
                    "VM '{}' changed while it moved (started, deleted or moved elsewhere): this node's copy was deleted",
                    row.name
                )));
            }
            Ok(())
        }
        .await;
        if let Err(err) = copied {
            self.remove_vm_files(&row.id, &made).await;
            return Err(err);
        }
        let state = state_of(&row)?;
        self.publish_vm(
            &row.id,
            &row.name,
            state,
            state,
            Some(format!("moved here from node {}", source.name)),
        );
        self.vm_info(&row.id)
    }

    /// Fetches disk `name` from `url` into this node's pool, checked against the SHA-256 the
    /// source sent.
    async fn fetch_disk(&self, client: &reqwest::Client, secret: &str, url: &str, name: &str) -> Result<(), ApiError> {
        let failed = |why: String| ApiError::Sandbox(format!("copying disk '{name}' from its node: {why}"));
        let response = super::layer_fetch::get_from_node(client, secret, url)
            .await
            .map_err(failed)?;
        let sha256 = response
            .headers()
            .get(DISK_SHA256_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| failed("no SHA-256 came with it".into()))?
            .to_owned();
        let announced = response.content_length();
        let stream = futures::TryStreamExt::map_err(response.bytes_stream(), std::io::Error::other);
        let mut reader = tokio_util::io::StreamReader::new(stream);
        self.upload_disk(name, &sha256, announced, &mut reader).await?;
        Ok(())
    }

    /// Fetches the VM's NVRAM (when the source has one) into its directory here.
    async fn fetch_nvram(&self, client: &reqwest::Client, secret: &str, url: &str, id: &str) -> Result<(), ApiError> {
        let failed = |why: String| ApiError::Sandbox(format!("copying the VM's UEFI variables: {why}"));
        let response = super::layer_fetch::get_from_node(client, secret, url)
            .await
            .map_err(failed)?;
        if response.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(());
        }
        let bytes = response.bytes().await.map_err(|e| failed(e.to_string()))?;
        if bytes.len() > MAX_NVRAM_BYTES {
            return Err(failed(format!(
                "{} bytes is more than UEFI variables take",
                bytes.len()
            )));
        }
        let dir = self.vm_dir(id);
        std::fs::create_dir_all(&dir)
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt as _;
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            })
            .and_then(|()| std::fs::write(dir.join("nvram.fd"), &bytes))
            .map_err(|e| failed(e.to_string()))
    }
}
