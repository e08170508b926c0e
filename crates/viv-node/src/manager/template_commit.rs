//! Commits: a running sandbox's disk saved as a new version of a template
//! (`POST /sandboxes/{id}/commit`, `viv sandbox commit ID --template NAME`).
//!
//! The sandbox's writes are flushed and its overlay frozen as a filesystem-only `fork` node (the
//! sandbox goes on running on a new overlay, and the node is collected like any fork once nothing
//! descends from it); then the node's whole chain is written, relative to the final layer of the
//! template the sandbox started from, into a new layer `layers/commit-<key>.qcow2` whose backing
//! file is that layer. The new version keeps that template's layers and its own; the template's
//! plain name points at it, so later sandboxes of `NAME` boot a template snapshot of the
//! committed disk (memory is not kept: a commit is taken while the sandbox runs, and its
//! processes are not part of a template's recipe).
//!
//! Invariant: the layer is written under a temporary name in `builds/` and renamed into place;
//! until its version row lists it, the commit holds the template's name in the running builds
//! with the layer's key, so the collector keeps it; it is removed if the row cannot be written.

use std::path::Path;

use viv_api::TemplateVersion;

use super::builds::{valid_template_name, BuildSlot};
use super::Manager;
use crate::error::ApiError;
use crate::store::{now_rfc3339, SnapshotKind, TemplateRow};

impl Manager {
    /// Saves running sandbox `id`'s disk as a new version of `template`, which its plain name
    /// then points at.
    pub async fn commit_sandbox(&self, id: &str, template: &str) -> Result<TemplateVersion, ApiError> {
        if !valid_template_name(template) {
            return Err(ApiError::BadRequest(format!(
                "template name '{template}' is invalid: use 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit"
            )));
        }
        if self.store.snapshot(template)?.is_some()
            || self.images.find_named(template).is_ok()
            || self.store.version(template)?.is_some()
        {
            return Err(ApiError::Conflict(format!(
                "a snapshot, imported image or template version is already named '{template}'; choose another name"
            )));
        }
        let key = format!("commit-{}", super::random_id(24));
        // Holds the name (as a build does) and keeps the new layer from the collector until
        // its version row lists it.
        let _slot = {
            let mut running = self.builds.running.lock().expect("builds lock");
            if running.contains_key(template) {
                return Err(ApiError::Conflict(format!(
                    "template '{template}' is being built or committed; try again after that"
                )));
            }
            running.insert(template.to_owned(), vec![key.clone()]);
            BuildSlot {
                builds: &self.builds,
                name: template.to_owned(),
            }
        };
        let sandbox = self.store.sandbox(id)?.ok_or_else(|| ApiError::sandbox_not_found(id))?;
        let recipe = self.recipe(&sandbox.template_id)?;
        let base = self.store.template(&sandbox.template_id)?;
        let started = std::time::Instant::now();
        let (node, _) = self.snapshot_running(id, SnapshotKind::Fork, None, false).await?;
        let node_disk = self.node_dir(&node.id).join("disk.qcow2");
        let layers_dir = self.config.data_dir.join("layers");
        let layer = layers_dir.join(format!("{key}.qcow2"));
        let partial = self.config.data_dir.join("builds").join(format!("{key}.partial"));
        write_layer(&node_disk, &recipe.layer, &partial, &layer).await?;
        super::snapshots::seal(&layer)?;
        let mut layers = base.as_ref().map(|b| b.layers.clone()).unwrap_or_default();
        layers.push(key);
        let row = TemplateRow {
            name: template.to_owned(),
            from: format!("sandbox:{id}"),
            layer: layer.to_string_lossy().into_owned(),
            config: recipe.config,
            start: recipe.start,
            ready: recipe.ready,
            cpu_count: recipe.cpu_count,
            memory_mb: recipe.memory_mb,
            spec: format!(
                "{}# committed from sandbox {id} (template {})\n",
                base.map(|b| b.spec).unwrap_or_default(),
                sandbox.template_id
            ),
            layers: layers.clone(),
            created_at: now_rfc3339(),
            build_ms: started.elapsed().as_millis() as u64,
        };
        let (version, _) = match self.record_version(&row, &layers) {
            Ok(done) => done,
            Err(err) => {
                let _ = std::fs::remove_file(&layer);
                return Err(err);
            }
        };
        tracing::info!(sandbox = %id, template, version = %version, ms = row.build_ms, "sandbox committed");
        drop(_slot);
        let tagged = self
            .tag_version(template, super::sdk_spec::DEFAULT_TAG, &version)
            .await?;
        if let Err(err) = self.apply_retention(template).await {
            tracing::warn!(template, error = %err, "applying the version retention policy");
        }
        self.collect_layers();
        Ok(tagged)
    }
}

/// Writes the contents of `disk` (a qcow2 chain) that differ from `backing` into a new qcow2
/// `layer` backed by `backing`, through `partial` (a name the layer collector never looks at).
async fn write_layer(disk: &Path, backing: &Path, partial: &Path, layer: &Path) -> Result<(), ApiError> {
    for dir in [partial.parent(), layer.parent()].into_iter().flatten() {
        std::fs::create_dir_all(dir).map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
    }
    let out = tokio::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "qcow2", "-O", "qcow2", "-F", "qcow2", "-B"])
        .arg(backing)
        .arg(disk)
        .arg(partial)
        .output()
        .await
        .map_err(|e| ApiError::Unavailable(format!("running qemu-img (install qemu-utils): {e}")))?;
    if !out.status.success() {
        let _ = std::fs::remove_file(partial);
        return Err(ApiError::Internal(format!(
            "writing the committed disk into a layer: qemu-img convert failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    std::fs::rename(partial, layer).map_err(|e| {
        let _ = std::fs::remove_file(partial);
        ApiError::Internal(format!("storing {}: {e}", layer.display()))
    })
}
