//! Template snapshots: a template is booted once, snapshotted (device state in a file, guest
//! memory in a file on tmpfs, the disk frozen as a qcow2 layer), and every sandbox of it is a
//! restore of that snapshot.
//!
//! Invariants: a snapshot directory is used only once it has a `ready` marker and its memory file
//! exists; it is built under a temporary name and renamed into place, so an interrupted build is
//! never used and is removed at the next build. The key covers everything the restored state
//! depends on (root layer, kernel, initramfs, vCPUs, memory, accelerator, QEMU version), so a
//! change to any of them builds a new snapshot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{Manager, Origin};
use crate::error::ApiError;

/// Bumped when the snapshot layout or the steps before it change.
const SNAPSHOT_FORMAT: u32 = 3;

/// A ready template snapshot.
#[derive(Debug)]
pub struct TemplateSnapshot {
    /// The frozen disk layer clones' overlays sit on.
    pub disk: PathBuf,
    /// Device state.
    pub state: PathBuf,
    /// Guest memory, mapped privately by clones.
    pub memory_file: PathBuf,
}

/// Known snapshots, and the lock that serializes builds.
pub struct TemplateCache {
    ready: Mutex<HashMap<String, Arc<TemplateSnapshot>>>,
    build: tokio::sync::Mutex<()>,
    qemu_version: String,
}

impl TemplateCache {
    /// An empty cache for snapshots made with this QEMU version.
    pub fn new(qemu_version: String) -> Self {
        Self {
            ready: Mutex::new(HashMap::new()),
            build: tokio::sync::Mutex::new(()),
            qemu_version,
        }
    }
}

impl Manager {
    fn template_key(&self, layer: &Path, vcpus: u32, memory_mib: u32) -> String {
        let mut hash = Sha256::new();
        for part in [
            layer.to_string_lossy().as_ref(),
            &self.boot.kernel.to_string_lossy(),
            &self.boot.initramfs.to_string_lossy(),
            &self.accel.to_string(),
            &self.templates.qemu_version,
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        hash.update(vcpus.to_le_bytes());
        hash.update(memory_mib.to_le_bytes());
        hash.update(SNAPSHOT_FORMAT.to_le_bytes());
        hex::encode(&hash.finalize()[..10])
    }

    fn snapshot_paths(&self, key: &str) -> (PathBuf, TemplateSnapshot) {
        let dir = self.config.data_dir.join("templates").join(key);
        let snapshot = TemplateSnapshot {
            disk: dir.join("disk.qcow2"),
            state: dir.join("state"),
            memory_file: self.shm_dir.join("templates").join(format!("{key}.mem")),
        };
        (dir, snapshot)
    }

    /// The snapshot of `template` for this VM shape, built on first use.
    pub(super) async fn template(
        &self,
        template: &str,
        layer: &Path,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<Arc<TemplateSnapshot>, ApiError> {
        let key = self.template_key(layer, vcpus, memory_mib);
        if let Some(found) = self.templates.ready.lock().expect("template lock").get(&key) {
            return Ok(found.clone());
        }
        let _building = self.templates.build.lock().await;
        if let Some(found) = self.templates.ready.lock().expect("template lock").get(&key) {
            return Ok(found.clone());
        }
        let (dir, snapshot) = self.snapshot_paths(&key);
        let usable = dir.join("ready").is_file()
            && std::fs::metadata(&snapshot.memory_file).is_ok_and(|m| m.len() == u64::from(memory_mib) << 20);
        if !usable {
            let started = std::time::Instant::now();
            tracing::info!(template, vcpus, memory_mib, "building the template snapshot");
            self.build_snapshot(&key, layer, vcpus, memory_mib).await?;
            tracing::info!(
                template,
                ms = started.elapsed().as_millis() as u64,
                "template snapshot ready"
            );
        }
        let snapshot = Arc::new(snapshot);
        self.templates
            .ready
            .lock()
            .expect("template lock")
            .insert(key, snapshot.clone());
        Ok(snapshot)
    }

    async fn build_snapshot(&self, key: &str, layer: &Path, vcpus: u32, memory_mib: u32) -> Result<(), ApiError> {
        let (dir, snapshot) = self.snapshot_paths(key);
        let parent = self.config.data_dir.join("templates");
        let building = parent.join(format!("{key}.building"));
        let memory_building = snapshot.memory_file.with_extension("building");
        for stale in [&dir, &building] {
            let _ = std::fs::remove_dir_all(stale);
        }
        let _ = std::fs::remove_file(&memory_building);
        let mkdir = |d: &Path| {
            std::fs::create_dir_all(d).map_err(|e| ApiError::Internal(format!("creating {}: {e}", d.display())))
        };
        mkdir(&building)?;
        mkdir(snapshot.memory_file.parent().expect("memory file has a directory"))?;
        let result = async {
            let id = format!("template-{key}");
            let origin = Origin::Boot {
                layer,
                memory_file: memory_building.clone(),
            };
            let live = self.start_vm(&id, &building, origin, vcpus, memory_mib).await?;
            // Gives the agent the channel key that every restore of this snapshot will use.
            self.init_agent(&live, None, None).await?;
            // The host hangs up first, so the agent drops the session and anything it still
            // had to send; a restored agent starts afresh with the next host's preface.
            live.agent.close().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            let state = building.join("state");
            let saved = live.vm.snapshot(&state, viv_vmm::SnapshotMemory::External).await;

            let _ = live.vm.kill().await;
            saved.map_err(|e| ApiError::Internal(format!("snapshotting the template: {e}")))?;
            for leftover in ["agent.sock", "qmp.sock", "console.log", "qemu.log"] {
                let _ = std::fs::remove_file(building.join(leftover));
            }
            std::fs::rename(building.join("root.qcow2"), building.join("disk.qcow2"))
                .and_then(|()| std::fs::rename(&memory_building, &snapshot.memory_file))
                .and_then(|()| std::fs::write(building.join("ready"), b""))
                .and_then(|()| std::fs::rename(&building, &dir))
                .map_err(|e| ApiError::Internal(format!("storing the template snapshot: {e}")))?;
            Ok(())
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&building);
            let _ = std::fs::remove_file(&memory_building);
        }
        result
    }
}
