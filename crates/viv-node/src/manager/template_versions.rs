//! Template versions: every build of a template (and every commit of a sandbox into one) is kept
//! as a version, a template row named `NAME-<content hash>` that sandboxes start from like any
//! template; tags (`default` is the plain name `NAME`, tag `T` the row `NAME:T`) are copies of a
//! version's row, and `template_tags` records which version each copy is of.
//!
//! Invariants: a version's id is the hash of everything its sandboxes depend on (final layer key,
//! configuration, start and ready commands, shape), so an unchanged spec makes no new version; a
//! version is deleted only when no tag points at it (409 naming the tags) and no sandbox or node
//! uses it; its layers go with it unless another row (version, tag, other template) keeps them,
//! since the collector keeps every layer any template row lists.

use std::collections::HashSet;
use std::path::PathBuf;

use sha2::{Digest, Sha256};
use viv_api::TemplateVersion;

use super::sdk_spec::{row_name, split_ref, valid_tag, DEFAULT_TAG};
use super::Manager;
use crate::error::ApiError;
use crate::store::{now_rfc3339, TemplateRow, VersionRow};

/// Hex digits of a version id's hash.
const VERSION_HASH_LEN: usize = 12;

/// Whether two rows start sandboxes the same way.
pub(super) fn same_recipe(a: &TemplateRow, b: &TemplateRow) -> bool {
    a.layer == b.layer
        && a.config == b.config
        && a.start == b.start
        && a.ready == b.ready
        && a.cpu_count == b.cpu_count
        && a.memory_mb == b.memory_mb
}

/// The id of the version of template `template` that `row` is: `template-<hash>`.
fn version_id(template: &str, row: &TemplateRow) -> String {
    let mut hash = Sha256::new();
    let layer = PathBuf::from(&row.layer);
    let key = layer
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    for part in [
        key,
        serde_json::to_string(&row.config).expect("config serializes"),
        serde_json::to_string(&row.start).expect("command serializes"),
        serde_json::to_string(&row.ready).expect("command serializes"),
    ] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hash.update(row.cpu_count.to_le_bytes());
    hash.update(row.memory_mb.to_le_bytes());
    let hex = hex::encode(hash.finalize());
    format!("{template}-{}", &hex[..VERSION_HASH_LEN])
}

impl Manager {
    /// Records the version a build or commit made of row `row` (`NAME` or `NAME:TAG`), whose own
    /// layers are `layers`, and points the row's tag at it. Returns the version id and whether it
    /// is new.
    pub(super) fn record_version(&self, row: &TemplateRow, layers: &[String]) -> Result<(String, bool), ApiError> {
        let (template, tag) = split_ref(&row.name);
        let id = version_id(template, row);
        let created = self.store.version(&id)?.is_none();
        if created {
            let mut version = row.clone();
            version.name = id.clone();
            version.layers = layers.to_vec();
            let parent = self.store.tag(template, DEFAULT_TAG)?;
            self.store.put_version(
                &version,
                &VersionRow {
                    id: id.clone(),
                    template: template.to_owned(),
                    parent,
                    created_at: now_rfc3339(),
                },
            )?;
        }
        self.store.put_tag(template, tag, &id)?;
        Ok((id, created))
    }

    /// The version template row `name` (`NAME` or `NAME:TAG`) is a copy of, if known (a
    /// version's own row is itself).
    pub(super) fn version_of_row(&self, name: &str) -> Result<Option<String>, ApiError> {
        if self.store.version(name)?.is_some() {
            return Ok(Some(name.to_owned()));
        }
        let (template, tag) = split_ref(name);
        Ok(self.store.tag(template, tag)?)
    }

    /// After row `name` was deleted: forgets its tag, and deletes the versions of its template
    /// once no tag is left and nothing uses them.
    pub(super) fn forget_tag_row(&self, name: &str) -> Result<(), ApiError> {
        let (template, tag) = split_ref(name);
        self.store.delete_tag(template, tag)?;
        if self.store.tags(template)?.is_empty() {
            for version in self.store.versions(template)? {
                if self.template_users(&version.id)?.is_none() {
                    self.store.delete_version(&version.id)?;
                }
            }
        }
        Ok(())
    }

    /// Keeps row `name` in step with a copy of `source` written by the SDK's tag route.
    pub(super) fn retag_row(&self, name: &str, source: &str) -> Result<(), ApiError> {
        let (template, tag) = split_ref(name);
        match self.version_of_row(source)? {
            Some(version) => self.store.put_tag(template, tag, &version)?,
            None => self.store.delete_tag(template, tag)?,
        }
        Ok(())
    }

    /// The retention policy (`--keep-versions N`): deletes the oldest versions of `template`
    /// beyond N that no tag points at and nothing uses.
    pub(super) async fn apply_retention(&self, template: &str) -> Result<(), ApiError> {
        let Some(keep) = self.config.keep_versions else {
            return Ok(());
        };
        let versions = self.store.versions(template)?;
        let tagged: HashSet<String> = self.store.tags(template)?.into_iter().map(|(_, v)| v).collect();
        let mut excess = versions.len().saturating_sub(keep as usize);
        for version in versions {
            if excess == 0 {
                break;
            }
            if tagged.contains(&version.id) || self.template_users(&version.id)?.is_some() {
                continue;
            }
            self.store.delete_version(&version.id)?;
            self.empty_pool(Some(&version.id)).await;
            tracing::info!(template, version = %version.id, "version deleted by the retention policy");
            excess -= 1;
        }
        Ok(())
    }

    /// `GET /templates/{name}/versions`: the versions of a template, oldest first.
    pub fn template_history(&self, template: &str) -> Result<Vec<TemplateVersion>, ApiError> {
        let versions = self.store.versions(template)?;
        if versions.is_empty() && self.store.template(template)?.is_none() {
            return Err(ApiError::NotFound(format!(
                "template '{template}' not found; `viv template list` shows the templates"
            )));
        }
        let tags = self.store.tags(template)?;
        versions.into_iter().map(|v| self.version_info(v, &tags)).collect()
    }

    fn version_info(&self, version: VersionRow, tags: &[(String, String)]) -> Result<TemplateVersion, ApiError> {
        let row = self
            .store
            .template(&version.id)?
            .ok_or_else(|| ApiError::Internal(format!("version {} has no template row", version.id)))?;
        let inherited: HashSet<String> = match &version.parent {
            Some(parent) => self.store.template(parent)?.map(|p| p.layers).unwrap_or_default(),
            None => Vec::new(),
        }
        .into_iter()
        .collect();
        let size_bytes = row
            .layers
            .iter()
            .filter(|k| !inherited.contains(*k))
            .filter_map(|k| std::fs::metadata(self.config.data_dir.join("layers").join(format!("{k}.qcow2"))).ok())
            .map(|m| {
                use std::os::unix::fs::MetadataExt as _;
                m.blocks() * 512
            })
            .sum();
        Ok(TemplateVersion {
            tags: tags
                .iter()
                .filter(|(_, v)| *v == version.id)
                .map(|(t, _)| t.clone())
                .collect(),
            version_id: version.id,
            template: version.template,
            created_at: version.created_at,
            size_bytes,
            parent: version.parent,
            from: row.from,
            layers: row.layers.len(),
        })
    }

    /// The version `id` of `template`, or a 404.
    fn version_of(&self, template: &str, id: &str) -> Result<VersionRow, ApiError> {
        match self.store.version(id)? {
            Some(v) if v.template == template => Ok(v),
            _ => Err(ApiError::NotFound(format!(
                "template '{template}' has no version '{id}'; `viv template history {template}` lists its versions"
            ))),
        }
    }

    /// `PUT /templates/{name}/tags/{tag}`: points a tag (`default`: the plain name) at a version.
    pub async fn tag_version(&self, template: &str, tag: &str, id: &str) -> Result<TemplateVersion, ApiError> {
        if !valid_tag(tag) {
            return Err(ApiError::BadRequest(format!(
                "tag '{tag}' is invalid: use 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )));
        }
        let version = self.version_of(template, id)?;
        let source = self
            .store
            .template(&version.id)?
            .ok_or_else(|| ApiError::Internal(format!("version {id} has no template row")))?;
        let name = row_name(template, tag);
        if self.builds.running.lock().expect("builds lock").contains_key(&name) {
            return Err(ApiError::Conflict(format!(
                "template '{name}' is being built; tag it after the build"
            )));
        }
        let mut row = source.clone();
        row.name = name.clone();
        if let Some(previous) = self.store.template(&name)? {
            if self.template_users(&name)?.is_some() {
                for key in previous.layers {
                    if !row.layers.contains(&key) {
                        row.layers.push(key);
                    }
                }
            }
        }
        self.store.put_template(&row)?;
        self.store.put_tag(template, tag, &version.id)?;
        self.empty_pool(Some(&name)).await;
        self.collect_layers();
        tracing::info!(template, tag, version = %version.id, "tag moved");
        let tags = self.store.tags(template)?;
        self.version_info(version, &tags)
    }

    /// `DELETE /templates/{name}/versions/{id}`: deletes a version no tag points at and nothing
    /// uses; its layers are freed unless another template row keeps them.
    pub async fn delete_version(&self, template: &str, id: &str) -> Result<(), ApiError> {
        let version = self.version_of(template, id)?;
        let tags: Vec<String> = self
            .store
            .tags(template)?
            .into_iter()
            .filter(|(_, v)| *v == version.id)
            .map(|(t, _)| t)
            .collect();
        if !tags.is_empty() {
            return Err(ApiError::Conflict(format!(
                "version '{id}' is what tag {} of template '{template}' point{} at; move {} first (`viv template tag {template}[:TAG] OTHER_VERSION`)",
                tags.iter().map(|t| format!("'{t}'")).collect::<Vec<_>>().join(", "),
                if tags.len() == 1 { "s" } else { "" },
                if tags.len() == 1 { "it" } else { "them" },
            )));
        }
        if let Some(users) = self.template_users(id)? {
            return Err(ApiError::Conflict(format!(
                "version '{id}' is still used by {users}; kill or delete those first"
            )));
        }
        self.store.delete_version(id)?;
        self.empty_pool(Some(id)).await;
        self.collect_layers();
        tracing::info!(template, version = %id, "version deleted");
        Ok(())
    }
}
