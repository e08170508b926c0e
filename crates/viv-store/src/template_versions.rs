//! Template versions and tags (tables `template_versions`, `template_tags`): a version is a
//! template row named `NAME-<hash>` listed here with its template; a tag names the version whose
//! copy is row `NAME` (tag `default`) or `NAME:TAG`.
//!
//! Invariant: a version row and its `template_versions` entry are written and deleted in one
//! transaction, so the collector never sees one without the other.

use super::db::{params, Row, Sql as _};

use super::{Store, StoreError, TemplateRow};

/// One version of a template.
#[derive(Debug, Clone)]
pub struct VersionRow {
    /// `NAME-<hash>`, also the name of its template row.
    pub id: String,
    /// `NAME`.
    pub template: String,
    /// The version `NAME` pointed at before this one was made.
    pub parent: Option<String>,
    /// When it was made (RFC 3339).
    pub created_at: String,
}

impl Store {
    /// Records a new version: its template row and its entry.
    pub fn put_version(&self, row: &TemplateRow, version: &VersionRow) -> Result<(), StoreError> {
        self.put_template(row)?;
        self.conn().execute(
            "INSERT INTO template_versions (id, template, parent, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT DO NOTHING",
            params![version.id, version.template, version.parent, version.created_at],
        )?;
        Ok(())
    }

    /// One version by id.
    pub fn version(&self, id: &str) -> Result<Option<VersionRow>, StoreError> {
        self.conn().query_row(
            "SELECT id, template, parent, created_at FROM template_versions WHERE id = ?1",
            params![id],
            row_to_version,
        )
    }

    /// The versions of a template, oldest first.
    pub fn versions(&self, template: &str) -> Result<Vec<VersionRow>, StoreError> {
        let mut conn = self.conn();
        conn.query_map(
            "SELECT id, template, parent, created_at FROM template_versions WHERE template = ?1 \
             ORDER BY created_at, rowid",
            params![template],
            row_to_version,
        )
    }

    /// Ids of every version of every template.
    pub fn version_ids(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        conn.query_map("SELECT id FROM template_versions", params![], |r| r.get(0))
    }

    /// Deletes a version: its row and its entry.
    pub fn delete_version(&self, id: &str) -> Result<(), StoreError> {
        self.db.transaction(|tx| {
            tx.execute("DELETE FROM templates WHERE name = ?1", params![id])?;
            tx.execute("DELETE FROM template_versions WHERE id = ?1", params![id])?;
            Ok(())
        })
    }

    /// Points `template`'s `tag` at `version`.
    pub fn put_tag(&self, template: &str, tag: &str, version: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO template_tags (template, tag, version) VALUES (?1, ?2, ?3) ON CONFLICT (template, tag) DO UPDATE SET version = excluded.version",
            params![template, tag, version],
        )?;
        Ok(())
    }

    /// The version `template`'s `tag` points at.
    pub fn tag(&self, template: &str, tag: &str) -> Result<Option<String>, StoreError> {
        self.conn().query_row(
            "SELECT version FROM template_tags WHERE template = ?1 AND tag = ?2",
            params![template, tag],
            |r| r.get(0),
        )
    }

    /// The tags of `template` as (tag, version), by tag.
    pub fn tags(&self, template: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn();
        conn.query_map(
            "SELECT tag, version FROM template_tags WHERE template = ?1 ORDER BY tag",
            params![template],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// Forgets a tag.
    pub fn delete_tag(&self, template: &str, tag: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "DELETE FROM template_tags WHERE template = ?1 AND tag = ?2",
            params![template, tag],
        )?;
        Ok(())
    }
}

fn row_to_version(r: &Row) -> Result<VersionRow, StoreError> {
    Ok(VersionRow {
        id: r.get(0)?,
        template: r.get(1)?,
        parent: r.get(2)?,
        created_at: r.get(3)?,
    })
}
