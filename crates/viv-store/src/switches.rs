//! Switch rows: a name, the index naming its bridge, its settings as JSON.
//!
//! Invariant: names and indexes are unique; [`Store::insert_switch`] takes the smallest free
//! index under the connection's lock, so two creates never share a bridge.

use super::db::{params, Row, Sql as _};

use super::{now_rfc3339, Store, StoreError};

/// A switch row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwitchRow {
    /// Name.
    pub name: String,
    /// Index (names the bridge).
    pub index: u32,
    /// `viv_api::switches::SwitchDefinition` as JSON.
    pub definition: String,
    /// RFC 3339.
    pub created_at: String,
}

fn row(r: &Row) -> Result<SwitchRow, StoreError> {
    Ok(SwitchRow {
        name: r.get(0)?,
        index: r.get(1)?,
        definition: r.get(2)?,
        created_at: r.get(3)?,
    })
}

impl Store {
    /// Records a switch with the smallest free index; `Ok(None)` when the name is taken.
    pub fn insert_switch(&self, name: &str, definition: &str) -> Result<Option<SwitchRow>, StoreError> {
        {
            // One connection guard: the index read and the insert are not interleaved with another.
            let mut conn = self.conn();
            let used = conn.query_map("SELECT idx FROM switches ORDER BY idx", params![], |r| r.get::<u32>(0))?;
            let index = (0u32..).find(|i| used.binary_search(i).is_err()).unwrap_or_default();
            let n = conn.execute(
                "INSERT INTO switches (name, idx, definition, created_at) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (name) DO NOTHING",
                params![name, index, definition, now_rfc3339()],
            )?;
            if n == 0 {
                return Ok(None);
            }
        }
        self.switch(name)
    }

    /// A switch by name.
    pub fn switch(&self, name: &str) -> Result<Option<SwitchRow>, StoreError> {
        self.conn().query_row(
            "SELECT name, idx, definition, created_at FROM switches WHERE name = ?1",
            params![name],
            row,
        )
    }

    /// Every switch, by name.
    pub fn list_switches(&self) -> Result<Vec<SwitchRow>, StoreError> {
        let mut conn = self.conn();
        let rows = conn.query_map(
            "SELECT name, idx, definition, created_at FROM switches ORDER BY name",
            params![],
            row,
        )?;
        Ok(rows)
    }

    /// Replaces a switch's settings; `Ok(false)` when there is no such switch.
    pub fn update_switch(&self, name: &str, definition: &str) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "UPDATE switches SET definition = ?2 WHERE name = ?1",
            params![name, definition],
        )?;
        Ok(n > 0)
    }

    /// Deletes a switch; `Ok(false)` when there was none.
    pub fn delete_switch(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .execute("DELETE FROM switches WHERE name = ?1", params![name])?
            > 0)
    }
}
