//! The SQL engine under the store: SQLite (embedded, one server's file, the default) or PostgreSQL
//! (shared by every API server of a cluster). The store's queries are written once, in the part
//! of SQL both engines speak, against [`Sql`]; this module hides the rest.
//!
//! Invariants:
//! - statements use numbered parameters `?1`, `?2`, …; for PostgreSQL they are rewritten to
//!   `$1`, `$2`, … outside string literals, and the word `rowid` (SQLite's insertion order, which
//!   breaks ties of equal times) to `seq`, a `BIGSERIAL` column the PostgreSQL schema gives the
//!   tables queried so; nothing else in a statement is rewritten. A parameter whose type only
//!   `IS NULL` would tell is cast (`CAST(?1 AS TEXT) IS NULL`): PostgreSQL must know its type;
//! - values cross as [`Value`]: integers are 64-bit on both engines (the PostgreSQL schema uses
//!   `BIGINT` for every integer column), text is UTF-8, booleans are integers 0 and 1;
//! - the PostgreSQL client blocks on a runtime of its own, which must not run inside a tokio
//!   runtime's context: called from a worker, each call leaves the context for its duration
//!   (`block_in_place`, which hands the worker's other tasks on) or, where that is not allowed
//!   (a current-thread runtime), runs on a scoped thread joined before it returns, so borrowed
//!   arguments stay valid and no call outlives its caller;
//! - a transaction ([`Db::transaction`]) commits only when its closure returns `Ok`; an error or
//!   a panic rolls it back;
//! - PostgreSQL is reached through [`PG_CONNECTIONS`] connections, each used by one caller at a
//!   time (a caller takes a free one, else waits for one), so API requests of one server query
//!   side by side; a transaction holds its connection to the end;
//! - a PostgreSQL connection that broke (the server restarted, the network failed) is replaced
//!   by a new one at the next call; the call that met the break fails with an error that says
//!   so ([`StoreError::is_unavailable`]), and nothing retries a statement by itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use super::StoreError;

/// How many connections a server keeps to PostgreSQL.
pub const PG_CONNECTIONS: usize = 4;

/// A value bound to a parameter or read from a column.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// A 64-bit integer (booleans as 0 and 1).
    Integer(i64),
    /// A double.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

/// Something that binds to a parameter.
pub trait ToValue {
    /// This as a [`Value`].
    fn to_value(&self) -> Value;
}

macro_rules! integer_to_value {
    ($($t:ty),*) => {$(
        impl ToValue for $t {
            fn to_value(&self) -> Value {
                Value::Integer(i64::from(*self))
            }
        }
    )*};
}
integer_to_value!(i64, i32, u32, u16, u8, bool);

impl ToValue for u64 {
    fn to_value(&self) -> Value {
        // Sizes and durations; none comes near 2^63.
        Value::Integer(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}
impl ToValue for usize {
    fn to_value(&self) -> Value {
        Value::Integer(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}
impl ToValue for f64 {
    fn to_value(&self) -> Value {
        Value::Real(*self)
    }
}
impl ToValue for str {
    fn to_value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}
impl ToValue for String {
    fn to_value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl ToValue for [u8] {
    fn to_value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl ToValue for Vec<u8> {
    fn to_value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl<T: ToValue + ?Sized> ToValue for &T {
    fn to_value(&self) -> Value {
        (**self).to_value()
    }
}
impl<T: ToValue> ToValue for Option<T> {
    fn to_value(&self) -> Value {
        self.as_ref().map_or(Value::Null, ToValue::to_value)
    }
}
impl ToValue for Value {
    fn to_value(&self) -> Value {
        self.clone()
    }
}

/// The parameters of a statement, in order.
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        &[$($crate::db::ToValue::to_value(&$p)),*] as &[$crate::db::Value]
    };
}
pub(crate) use params;

/// Something a column reads as.
pub trait FromValue: Sized {
    /// `value` as this type, or why not.
    fn from_value(value: &Value) -> Result<Self, String>;
}

macro_rules! integer_from_value {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(value: &Value) -> Result<Self, String> {
                match value {
                    Value::Integer(i) => <$t>::try_from(*i).map_err(|_| format!("{i} is out of range")),
                    other => Err(format!("expected an integer, found {other:?}")),
                }
            }
        }
    )*};
}
integer_from_value!(i64, i32, u32, u16, u64);

impl FromValue for bool {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Integer(i) => Ok(*i != 0),
            other => Err(format!("expected a boolean, found {other:?}")),
        }
    }
}
impl FromValue for f64 {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Real(r) => Ok(*r),
            Value::Integer(i) => Ok(*i as f64),
            other => Err(format!("expected a number, found {other:?}")),
        }
    }
}
impl FromValue for String {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Text(t) => Ok(t.clone()),
            other => Err(format!("expected text, found {other:?}")),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Blob(b) => Ok(b.clone()),
            Value::Text(t) => Ok(t.clone().into_bytes()),
            other => Err(format!("expected bytes, found {other:?}")),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Null => Ok(None),
            other => T::from_value(other).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug)]
pub struct Row {
    values: Vec<Value>,
}

impl Row {
    /// Column `index` (from 0) as `T`.
    pub fn get<T: FromValue>(&self, index: usize) -> Result<T, StoreError> {
        let value = self
            .values
            .get(index)
            .ok_or_else(|| StoreError::Column(format!("no column {index}")))?;
        T::from_value(value).map_err(|why| StoreError::Column(format!("column {index}: {why}")))
    }
}

/// What runs statements: a connection, or a transaction on one.
pub trait Sql {
    /// Runs a statement; returns the number of rows it changed.
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError>;
    /// Runs a query; returns its rows.
    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError>;
    /// Runs several statements with no parameters (migrations).
    fn batch(&mut self, sql: &str) -> Result<(), StoreError>;

    /// The first row of a query through `f`, or `None` when it has none.
    fn query_row<T>(
        &mut self,
        sql: &str,
        params: &[Value],
        f: impl FnOnce(&Row) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError>
    where
        Self: Sized,
    {
        self.query(sql, params)?.first().map(f).transpose()
    }

    /// Every row of a query through `f`.
    fn query_map<T>(
        &mut self,
        sql: &str,
        params: &[Value],
        f: impl FnMut(&Row) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError>
    where
        Self: Sized,
    {
        self.query(sql, params)?.iter().map(f).collect()
    }
}

/// The engine.
pub enum Db {
    /// An SQLite file.
    Sqlite(Mutex<rusqlite::Connection>),
    /// A PostgreSQL server.
    Postgres {
        /// The connections.
        clients: Box<[Mutex<PgClient>]>,
        /// Where the next caller starts looking for a free connection.
        next: AtomicUsize,
        /// Where to connect again when one breaks.
        url: String,
    },
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Sqlite(_) => "Db::Sqlite",
            Self::Postgres { .. } => "Db::Postgres",
        })
    }
}

/// A locked connection of either engine.
pub enum Conn<'a> {
    /// SQLite.
    Sqlite(MutexGuard<'a, rusqlite::Connection>),
    /// PostgreSQL.
    Postgres(MutexGuard<'a, PgClient>),
}

/// A PostgreSQL client that is dropped off the tokio runtime: closing it blocks on the client's
/// own runtime, which panics on a tokio worker.
pub struct PgClient(Option<postgres::Client>);

impl PgClient {
    /// Wraps a connected client.
    pub fn new(client: postgres::Client) -> Self {
        Self(Some(client))
    }

    fn client(&mut self) -> &mut postgres::Client {
        self.0
            .as_mut()
            .expect("a PgClient holds its client until it is dropped")
    }
}

impl Drop for PgClient {
    fn drop(&mut self) {
        if let Some(client) = self.0.take() {
            let _ = off_runtime(move || {
                drop(client);
                Ok(())
            });
        }
    }
}

impl Db {
    /// The connection, locked for the caller's statements.
    pub fn lock(&self) -> Conn<'_> {
        match self {
            Self::Sqlite(c) => Conn::Sqlite(c.lock().unwrap_or_else(std::sync::PoisonError::into_inner)),
            Self::Postgres { clients, next, url } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                let free = (0..clients.len()).find_map(|i| match clients[(start + i) % clients.len()].try_lock() {
                    Ok(guard) => Some(guard),
                    Err(TryLockError::Poisoned(poisoned)) => Some(poisoned.into_inner()),
                    Err(TryLockError::WouldBlock) => None,
                });
                let mut guard = free.unwrap_or_else(|| {
                    clients[start % clients.len()]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                });
                if guard.client().is_closed() {
                    match connect(url) {
                        Ok(fresh) => *guard = PgClient::new(fresh),
                        // The closed client fails the caller's statement with what happened.
                        Err(err) => tracing::warn!(%err, "reconnecting to PostgreSQL"),
                    }
                }
                Conn::Postgres(guard)
            }
        }
    }

    /// Runs `f` in a transaction, committed when it returns `Ok`.
    pub fn transaction<T: Send>(
        &self,
        f: impl FnOnce(&mut Tx<'_, '_>) -> Result<T, StoreError> + Send,
    ) -> Result<T, StoreError> {
        match self.lock() {
            Conn::Sqlite(conn) => {
                let tx = conn.unchecked_transaction()?;
                let mut wrapped = Tx::Sqlite(&tx);
                let value = f(&mut wrapped)?;
                tx.commit()?;
                Ok(value)
            }
            Conn::Postgres(mut guard) => {
                let client: &mut postgres::Client = guard.client();
                off_runtime(move || {
                    let mut tx = client.transaction()?;
                    let value = {
                        let mut wrapped = Tx::Postgres(&mut tx);
                        f(&mut wrapped)?
                    };
                    tx.commit()?;
                    Ok(value)
                })
            }
        }
    }
}

/// A transaction of either engine.
pub enum Tx<'a, 'c> {
    /// SQLite.
    Sqlite(&'a rusqlite::Transaction<'c>),
    /// PostgreSQL (already off the tokio runtime).
    Postgres(&'a mut postgres::Transaction<'c>),
}

impl Sql for Conn<'_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
        match self {
            Self::Sqlite(c) => sqlite_execute(c, sql, params),
            Self::Postgres(c) => {
                let client: &mut postgres::Client = c.client();
                off_runtime(move || pg_execute(client, sql, params))
            }
        }
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        match self {
            Self::Sqlite(c) => sqlite_query(c, sql, params),
            Self::Postgres(c) => {
                let client: &mut postgres::Client = c.client();
                off_runtime(move || pg_query(client, sql, params))
            }
        }
    }

    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Self::Postgres(c) => {
                let client: &mut postgres::Client = c.client();
                off_runtime(move || Ok(client.batch_execute(sql)?))
            }
        }
    }
}

impl Sql for Tx<'_, '_> {
    fn execute(&mut self, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
        match self {
            Self::Sqlite(tx) => sqlite_execute(tx, sql, params),
            Self::Postgres(tx) => pg_execute(&mut **tx, sql, params),
        }
    }

    fn query(&mut self, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
        match self {
            Self::Sqlite(tx) => sqlite_query(tx, sql, params),
            Self::Postgres(tx) => pg_query(&mut **tx, sql, params),
        }
    }

    fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(tx) => Ok(tx.execute_batch(sql)?),
            Self::Postgres(tx) => Ok(tx.batch_execute(sql)?),
        }
    }
}

/// The PostgreSQL engine at `url`, with its [`PG_CONNECTIONS`] connections open.
pub fn postgres(url: &str) -> Result<Db, StoreError> {
    let clients = (0..PG_CONNECTIONS)
        .map(|_| connect(url).map(|c| Mutex::new(PgClient::new(c))))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Db::Postgres {
        clients: clients.into_boxed_slice(),
        next: AtomicUsize::new(0),
        url: url.to_owned(),
    })
}

/// A new PostgreSQL connection (off any tokio worker: the client blocks on a runtime of its own).
pub fn connect(url: &str) -> Result<postgres::Client, StoreError> {
    off_runtime(|| Ok(postgres::Client::connect(url, postgres::NoTls)?))
}

/// Runs `f` where the PostgreSQL client may block: on this thread when it is not a tokio
/// runtime's; on a worker of a multi-threaded runtime, outside the runtime's context with the
/// worker's other tasks handed to another thread (`block_in_place`), so requests waiting on
/// the database do not hold up the rest; on any other runtime, on a scoped thread joined before
/// returning.
fn off_runtime<T: Send>(f: impl FnOnce() -> Result<T, StoreError> + Send) -> Result<T, StoreError> {
    match tokio::runtime::Handle::try_current() {
        Err(_) => f(),
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        Ok(_) => std::thread::scope(|scope| match scope.spawn(f).join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }),
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Self::Null => ValueRef::Null,
            Self::Integer(i) => ValueRef::Integer(*i),
            Self::Real(r) => ValueRef::Real(*r),
            Self::Text(t) => ValueRef::Text(t.as_bytes()),
            Self::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn sqlite_execute(conn: &rusqlite::Connection, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
    Ok(conn.execute(sql, rusqlite::params_from_iter(params))?)
}

fn sqlite_query(conn: &rusqlite::Connection, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
    let mut stmt = conn.prepare_cached(sql)?;
    let columns = stmt.column_count();
    let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
        let values = (0..columns)
            .map(|i| {
                Ok(match r.get_ref(i)? {
                    rusqlite::types::ValueRef::Null => Value::Null,
                    rusqlite::types::ValueRef::Integer(i) => Value::Integer(i),
                    rusqlite::types::ValueRef::Real(f) => Value::Real(f),
                    rusqlite::types::ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
                    rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                })
            })
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(Row { values })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// `?N` parameters as PostgreSQL's `$N` and `rowid` as `seq`, outside string literals.
pub fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut in_string = false;
    let mut chars = sql.char_indices().peekable();
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_';
    while let Some((i, c)) = chars.next() {
        match c {
            '\'' => {
                in_string = !in_string;
                out.push(c);
            }
            '?' if !in_string && chars.peek().is_some_and(|(_, d)| d.is_ascii_digit()) => out.push('$'),
            'r' if !in_string
                && sql[i..].starts_with("rowid")
                && !sql[..i].ends_with(word_char)
                && !sql[i + 5..].starts_with(word_char) =>
            {
                out.push_str("seq");
                for _ in 0..4 {
                    chars.next();
                }
            }
            _ => out.push(c),
        }
    }
    out
}

/// A [`Value`] bound to a PostgreSQL parameter of whatever type the statement gives it.
#[derive(Debug)]
struct PgParam<'a>(&'a Value);

impl postgres::types::ToSql for PgParam<'_> {
    fn to_sql(
        &self,
        ty: &postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use postgres::types::{IsNull, Type};
        match (self.0, ty) {
            (Value::Null, _) => Ok(IsNull::Yes),
            (Value::Integer(i), &Type::INT2) => i16::try_from(*i)?.to_sql(ty, out),
            (Value::Integer(i), &Type::INT4) => i32::try_from(*i)?.to_sql(ty, out),
            (Value::Integer(i), &Type::BOOL) => (*i != 0).to_sql(ty, out),
            (Value::Integer(i), &Type::FLOAT8) => (*i as f64).to_sql(ty, out),
            (Value::Integer(i), _) => i.to_sql(ty, out),
            (Value::Real(r), _) => r.to_sql(ty, out),
            (Value::Text(t), _) => t.as_str().to_sql(ty, out),
            (Value::Blob(b), _) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &postgres::types::Type) -> bool {
        // Checked per value in `to_sql`, where the value is known.
        true
    }

    postgres::types::to_sql_checked!();
}

fn pg_params(params: &[Value]) -> Vec<PgParam<'_>> {
    params.iter().map(PgParam).collect()
}

fn pg_execute(client: &mut impl postgres::GenericClient, sql: &str, params: &[Value]) -> Result<usize, StoreError> {
    let bound = pg_params(params);
    let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = bound.iter().map(|p| p as _).collect();
    let n = client.execute(to_postgres(sql).as_str(), &refs)?;
    Ok(usize::try_from(n).unwrap_or(usize::MAX))
}

fn pg_query(client: &mut impl postgres::GenericClient, sql: &str, params: &[Value]) -> Result<Vec<Row>, StoreError> {
    use postgres::types::Type;
    let bound = pg_params(params);
    let refs: Vec<&(dyn postgres::types::ToSql + Sync)> = bound.iter().map(|p| p as _).collect();
    let rows = client.query(to_postgres(sql).as_str(), &refs)?;
    rows.iter()
        .map(|row| {
            let values = row
                .columns()
                .iter()
                .enumerate()
                .map(|(i, column)| {
                    Ok(match *column.type_() {
                        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map_or(Value::Null, Value::Integer),
                        Type::INT4 => row
                            .try_get::<_, Option<i32>>(i)?
                            .map_or(Value::Null, |v| Value::Integer(v.into())),
                        Type::INT2 => row
                            .try_get::<_, Option<i16>>(i)?
                            .map_or(Value::Null, |v| Value::Integer(v.into())),
                        Type::BOOL => row
                            .try_get::<_, Option<bool>>(i)?
                            .map_or(Value::Null, |v| Value::Integer(v.into())),
                        Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map_or(Value::Null, Value::Real),
                        Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map_or(Value::Null, Value::Blob),
                        _ => row.try_get::<_, Option<String>>(i)?.map_or(Value::Null, Value::Text),
                    })
                })
                .collect::<Result<Vec<_>, postgres::Error>>()?;
            Ok(Row { values })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_parameters_become_dollars_outside_strings() {
        assert_eq!(
            to_postgres("UPDATE t SET a = ?2, b = 'why?1' WHERE id = ?1 AND c = ?"),
            "UPDATE t SET a = $2, b = 'why?1' WHERE id = $1 AND c = ?"
        );
        assert_eq!(to_postgres("SELECT 'it''s ?1', ?10"), "SELECT 'it''s ?1', $10");
        assert_eq!(
            to_postgres("SELECT rowid, rowids, my_rowid, 'rowid' FROM t ORDER BY created_at, rowid"),
            "SELECT seq, rowids, my_rowid, 'rowid' FROM t ORDER BY created_at, seq"
        );
    }

    #[test]
    fn values_read_back_as_the_types_written() {
        let row = Row {
            values: vec![
                Value::Integer(7),
                Value::Null,
                Value::Text("x".into()),
                Value::Integer(1),
                Value::Integer(-1),
            ],
        };
        assert_eq!(row.get::<u32>(0).unwrap(), 7);
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
        assert_eq!(row.get::<String>(2).unwrap(), "x");
        assert!(row.get::<bool>(3).unwrap());
        assert!(row.get::<u32>(4).is_err(), "a negative count is an error, not a wrap");
        assert!(row.get::<String>(0).is_err());
        assert!(row.get::<i64>(9).is_err());
    }
}
