//! The template catalog: listing templates and their info, who uses a template, deleting one,
//! and collecting the layer files no template needs any more.
//!
//! Invariants: a template used by sandboxes or snapshot nodes is never deleted (409 naming
//! them); a layer file is removed only when no template row lists its key and no running build
//! made or uses it (see `builds.rs`).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use viv_api::TemplateInfo;

use super::Manager;
use crate::error::ApiError;
use crate::store::TemplateRow;

impl Manager {
    /// Who uses a template: a description of the sandboxes and snapshot nodes started from it.
    pub(super) fn template_users(&self, name: &str) -> Result<Option<String>, ApiError> {
        let sandboxes: Vec<String> = self
            .store
            .sandboxes()?
            .into_iter()
            .filter(|s| s.template_id == name)
            .map(|s| s.id)
            .collect();
        let nodes: Vec<String> = self
            .store
            .snapshots()?
            .into_iter()
            .filter(|n| n.template_id == name)
            .map(|n| n.id)
            .collect();
        let mut users = Vec::new();
        if !sandboxes.is_empty() {
            users.push(format!("sandboxes {}", sandboxes.join(", ")));
        }
        if !nodes.is_empty() {
            users.push(format!("snapshots {}", nodes.join(", ")));
        }
        Ok((!users.is_empty()).then(|| users.join(" and ")))
    }

    /// Deletes a built template nothing uses, with its layers and snapshots (a version id
    /// deletes that version).
    pub async fn delete_template(&self, name: &str) -> Result<(), ApiError> {
        if let Some(version) = self.store.version(name)? {
            return self.delete_version(&version.template, name).await;
        }
        if name == viv_api::DEFAULT_TEMPLATE {
            return Err(ApiError::Conflict(
                "the built-in template 'base' cannot be deleted".into(),
            ));
        }
        if self.store.template(name)?.is_none() {
            return Err(ApiError::NotFound(format!(
                "template '{name}' not found; `viv template list` shows the built templates"
            )));
        }
        if self.builds.running.lock().expect("builds lock").contains_key(name) {
            return Err(ApiError::Conflict(format!(
                "template '{name}' is being built; delete it afterwards"
            )));
        }
        if let Some(users) = self.template_users(name)? {
            return Err(ApiError::Conflict(format!(
                "template '{name}' is still used by {users}; kill or delete those first"
            )));
        }
        self.store.delete_template(name)?;
        self.forget_tag_row(name)?;
        self.empty_pool(Some(name)).await;
        self.collect_layers();
        tracing::info!(template = %name, "template deleted");
        Ok(())
    }

    /// Drops what this node keeps of templates deleted through another node of the cluster
    /// (the store no longer names them): their warm VMs, layers and template snapshots, as a
    /// delete here does. Run at each heartbeat.
    pub async fn sweep_deleted_templates(&self) {
        for template in self.pool.templates() {
            let gone = template != viv_api::DEFAULT_TEMPLATE && matches!(self.store.template(&template), Ok(None));
            if gone {
                tracing::info!(%template, "template deleted on another node: emptying its warm VMs here");
                self.empty_pool(Some(&template)).await;
            }
        }
        self.collect_layers();
    }

    /// Removes layers no template keeps and no build uses, and the template snapshots booted
    /// from removed layers. Files being written (a dot-prefixed name: a layer fetched from
    /// another node) are left alone.
    pub(super) fn collect_layers(&self) {
        let Ok(rows) = self.store.templates() else { return };
        let mut live: HashSet<String> = rows.into_iter().flat_map(|r| r.layers).collect();
        live.extend(
            self.builds
                .running
                .lock()
                .expect("builds lock")
                .values()
                .flatten()
                .cloned(),
        );
        let layers_dir = self.config.data_dir.join("layers");
        for entry in std::fs::read_dir(&layers_dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let key = name.strip_suffix(".qcow2").unwrap_or(&name);
            if !name.starts_with('.') && !live.contains(key) {
                tracing::info!(layer = %name, "removing an unused layer");
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let templates_dir = self.config.data_dir.join("templates");
        let mut dropped = Vec::new();
        for entry in std::fs::read_dir(&templates_dir).into_iter().flatten().flatten() {
            let Ok(layer) = std::fs::read_to_string(entry.path().join("layer")) else {
                continue;
            };
            let layer = PathBuf::from(layer);
            if layer.starts_with(&layers_dir) && !layer.is_file() {
                let key = entry.file_name().to_string_lossy().into_owned();
                let _ = std::fs::remove_dir_all(entry.path());
                for memory in std::fs::read_dir(self.shm_dir.join("templates"))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    if memory.file_name().to_string_lossy().starts_with(&key) {
                        let _ = std::fs::remove_file(memory.path());
                    }
                }
                dropped.push(key);
            }
        }
        self.templates.forget(&dropped);
    }

    pub(super) fn template_info_of(&self, row: TemplateRow) -> TemplateInfo {
        let row_name = row.name.clone();
        let size_bytes = row
            .layers
            .iter()
            .filter_map(|k| std::fs::metadata(self.layer_path(k)).ok())
            .map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.blocks() * 512
            })
            .sum();
        TemplateInfo {
            template_id: row.name.clone(),
            aliases: vec![row.name],
            kind: "built".into(),
            from: Some(row.from),
            cpu_count: row.cpu_count,
            memory_mb: row.memory_mb,
            build_status: "ready".into(),
            env_vars: row.config.env,
            start_cmd: row.start.map(|c| c.to_string()),
            ready_cmd: row.ready.map(|r| r.command.to_string()),
            layers: row.layers.len(),
            size_bytes,
            created_at: Some(row.created_at),
            build_ms: Some(row.build_ms),
            envd_version: viv_proto::ENVD_VERSION.to_owned(),
            version_id: self.version_of_row(&row_name).ok().flatten(),
            version_created: None,
        }
    }

    fn plain_template_info(&self, name: &str, kind: &str) -> TemplateInfo {
        TemplateInfo {
            template_id: name.to_owned(),
            aliases: vec![name.to_owned()],
            kind: kind.into(),
            from: None,
            cpu_count: self.config.vcpus,
            memory_mb: self.config.memory_mib,
            build_status: "ready".into(),
            env_vars: BTreeMap::new(),
            start_cmd: None,
            ready_cmd: None,
            layers: 0,
            size_bytes: 0,
            created_at: None,
            build_ms: None,
            envd_version: viv_proto::ENVD_VERSION.to_owned(),
            version_id: None,
            version_created: None,
        }
    }

    /// Every template: `base`, the built ones and the imported images.
    pub fn list_templates(&self) -> Result<Vec<TemplateInfo>, ApiError> {
        let mut all = vec![self.plain_template_info(viv_api::DEFAULT_TEMPLATE, "builtin")];
        // Versions are listed by `GET /templates/{name}/versions`, not as templates of their own.
        let versions: HashSet<String> = self.store.version_ids()?.into_iter().collect();
        all.extend(
            self.store
                .templates()?
                .into_iter()
                .filter(|r| !versions.contains(&r.name))
                .map(|r| self.template_info_of(r)),
        );
        all.extend(
            self.images
                .named_images()
                .iter()
                .map(|name| self.plain_template_info(name, "image")),
        );
        Ok(all)
    }

    /// One template by name.
    pub fn get_template(&self, name: &str) -> Result<TemplateInfo, ApiError> {
        if name == viv_api::DEFAULT_TEMPLATE {
            return Ok(self.plain_template_info(name, "builtin"));
        }
        if let Some(row) = self.store.template(name)? {
            return Ok(self.template_info_of(row));
        }
        self.recipe(name)?;
        Ok(self.plain_template_info(name, "image"))
    }
}
