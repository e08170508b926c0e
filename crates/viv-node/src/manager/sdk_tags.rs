//! Tags of the SDK's templates: rows `name` (tag `default`) and `name:tag` holding the same
//! recipe, with the build that made each recorded in `template_builds`.
//!
//! Invariants: a tag row replaced while sandboxes use it keeps their layers; a tag is removed
//! only through the template delete (409 while used), which drops its build record too.

use serde::Serialize;

use super::sdk_spec;
use super::Manager;
use crate::error::ApiError;
use crate::store::TemplateRow;

/// A tag of a template.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TagInfo {
    tag: String,
    #[serde(rename = "buildID")]
    build_id: String,
    created_at: String,
}

/// `POST /templates/tags` answer.
#[derive(Debug, Serialize)]
pub struct AssignedTags {
    tags: Vec<String>,
    #[serde(rename = "buildID")]
    build_id: String,
}
impl Manager {
    /// Writes `source`'s recipe as row `name`, keeping the layers the old row's users sit on.
    pub(super) async fn put_tag_row(&self, source: &TemplateRow, name: &str, build_id: &str) -> Result<(), ApiError> {
        let mut row = source.clone();
        row.name = name.to_owned();
        if let Some(previous) = self.store.template(name)? {
            if self.template_users(name)?.is_some() {
                for key in previous.layers {
                    if !row.layers.contains(&key) {
                        row.layers.push(key);
                    }
                }
            }
        }
        self.store.put_template(&row)?;
        self.retag_row(name, &source.name)?;
        self.store.put_template_build(name, build_id)?;
        self.empty_pool(Some(name)).await;
        Ok(())
    }

    /// The rows of template `name`: `name` and `name:*`.
    pub(super) fn template_rows(&self, name: &str) -> Result<Vec<TemplateRow>, ApiError> {
        let prefix = format!("{name}:");
        Ok(self
            .store
            .templates()?
            .into_iter()
            .filter(|row| row.name == name || row.name.starts_with(&prefix))
            .collect())
    }

    /// `GET /templates/aliases/{alias}`: whether a template (or one of its tags) has that name.
    pub fn sdk_alias_exists(&self, alias: &str) -> Result<bool, ApiError> {
        let (name, tag) = sdk_spec::split_ref(alias);
        if name == viv_api::DEFAULT_TEMPLATE {
            return Ok(true);
        }
        if alias.contains(':') {
            return Ok(self.store.template(&sdk_spec::row_name(name, tag))?.is_some());
        }
        Ok(!self.template_rows(name)?.is_empty())
    }

    /// `GET /templates/{id}/tags`.
    pub fn sdk_tags(&self, template: &str) -> Result<Vec<TagInfo>, ApiError> {
        let rows = self.template_rows(template)?;
        if rows.is_empty() {
            return Err(ApiError::NotFound(format!("template '{template}' not found")));
        }
        rows.iter()
            .map(|row| {
                let tag = row
                    .name
                    .split_once(':')
                    .map(|(_, t)| t.to_owned())
                    .unwrap_or_else(|| sdk_spec::DEFAULT_TAG.to_owned());
                Ok(TagInfo {
                    tag,
                    build_id: self
                        .store
                        .template_build(&row.name)?
                        .unwrap_or_else(|| derived_build_id(row)),
                    created_at: row.created_at.clone(),
                })
            })
            .collect()
    }

    /// `POST /templates/tags`: points `tags` at the build `target` (`name:tag`) names.
    pub async fn sdk_assign_tags(&self, target: &str, tags: Vec<String>) -> Result<AssignedTags, ApiError> {
        let (name, tag) = sdk_spec::split_ref(target);
        let source = self
            .store
            .template(&sdk_spec::row_name(name, tag))?
            .ok_or_else(|| ApiError::NotFound(format!("template '{target}' not found")))?;
        if tags.is_empty() {
            return Err(ApiError::BadRequest("give at least one tag".into()));
        }
        let build_id = self
            .store
            .template_build(&source.name)?
            .unwrap_or_else(|| derived_build_id(&source));
        let mut assigned = Vec::new();
        for given in tags {
            let tag = given
                .rsplit_once(':')
                .map(|(_, t)| t.to_owned())
                .unwrap_or(given.clone());
            if !sdk_spec::valid_tag(&tag) {
                return Err(ApiError::BadRequest(format!("tag '{given}' is invalid")));
            }
            let row = sdk_spec::row_name(name, &tag);
            if row != source.name {
                if self.builds.running.lock().expect("builds lock").contains_key(&row) {
                    return Err(ApiError::Conflict(format!("tag '{tag}' of '{name}' is being built")));
                }
                self.put_tag_row(&source, &row, &build_id).await?;
            }
            assigned.push(given);
        }
        Ok(AssignedTags {
            tags: assigned,
            build_id,
        })
    }

    /// `DELETE /templates/tags`: removes tags of template `name` (refused while used).
    pub async fn sdk_delete_tags(&self, name: &str, tags: Vec<String>) -> Result<(), ApiError> {
        if tags.is_empty() {
            return Err(ApiError::BadRequest("give at least one tag".into()));
        }
        let name = sdk_spec::split_ref(name).0;
        let rows: Vec<String> = tags
            .iter()
            .map(|given| {
                let tag = given.rsplit_once(':').map(|(_, t)| t).unwrap_or(given);
                sdk_spec::row_name(name, tag)
            })
            .collect();
        for (row, given) in rows.iter().zip(&tags) {
            if self.store.template(row)?.is_none() {
                return Err(ApiError::NotFound(format!("template '{name}' has no tag '{given}'")));
            }
        }
        for row in rows {
            self.delete_template(&row).await?;
        }
        if self.template_rows(name)?.is_empty() {
            // The last tag is gone: so are the template's uploaded files.
            let _ = std::fs::remove_dir_all(self.files_dir(name));
        }
        Ok(())
    }
}

/// A stable build id for a row the SDK did not build (a Dockerfile build).
fn derived_build_id(row: &TemplateRow) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{}\0{}\0{}", row.name, row.layer, row.created_at));
    super::uuid_shaped(digest[..16].try_into().expect("a SHA-256 digest has 32 bytes"))
}
