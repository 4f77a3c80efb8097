//! A connection of one namespace, with the rules every statement passes before it runs:
//! the namespace's read/write blocks and the write gate.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use libsql_sys::rusqlite::{self, hooks::AuthAction, hooks::AuthContext, hooks::Authorization};

use super::{synchronous_pragma, EngineConnection, Shared, WritePermit};

/// PRAGMAs a client may read but not set: `journal_mode` and `locking_mode` would take writes
/// out of the WAL and so out of the replication log, `page_size` out of the log's format,
/// and the others would change the server's settings for every later user of a pooled
/// connection (durability, size limit) or let a client corrupt the schema.
const GUARDED_PRAGMAS: &[&str] =
    &["journal_mode", "locking_mode", "page_size", "synchronous", "max_page_count", "wal_autocheckpoint", "writable_schema"];

/// Refuses, at prepare time, what client SQL must not do on a server connection: ATTACH
/// (another file, maybe another tenant's, and writes that bypass this log) and setting a
/// guarded PRAGMA. `internal` is raised while the server applies its own settings.
fn install_authorizer(conn: &rusqlite::Connection, internal: Arc<AtomicBool>) {
    conn.authorizer(Some(move |ctx: AuthContext<'_>| match ctx.action {
        // VACUUM attaches a nameless temporary database; any named file is refused (which also
        // refuses VACUUM INTO a file).
        AuthAction::Attach { filename } if !filename.is_empty() => Authorization::Deny,
        AuthAction::Pragma { pragma_name, pragma_value: Some(_) }
            if !internal.load(Ordering::Relaxed) && GUARDED_PRAGMAS.iter().any(|p| p.eq_ignore_ascii_case(pragma_name)) =>
        {
            Authorization::Deny
        }
        _ => Authorization::Allow,
    }));
}

/// Prepared statements kept per connection: a client's working set of queries.
const STATEMENT_CACHE_CAPACITY: usize = 128;

/// Whether a statement needs the namespace's write lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StmtKind {
    Read,
    Write,
}

impl StmtKind {
    /// `BEGIN IMMEDIATE` and `BEGIN EXCLUSIVE` count as writes: SQLite reports every
    /// transaction-control statement as read-only, yet these take its write lock at once.
    pub fn of(stmt: &rusqlite::Statement<'_>, sql: &str) -> Self {
        if !stmt.readonly() || begins_write_transaction(sql) {
            StmtKind::Write
        } else {
            StmtKind::Read
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("reads are blocked on this namespace{}", reason_suffix(.0))]
    ReadsBlocked(Option<String>),
    #[error("writes are blocked on this namespace{}", reason_suffix(.0))]
    WritesBlocked(Option<String>),
    #[error("timed out waiting for the namespace's write lock (another transaction is writing)")]
    WriteLockTimeout,
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

fn reason_suffix(reason: &Option<String>) -> String {
    reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
}

pub struct Connection {
    /// Declared first so it is dropped first: an open transaction rolls back before the write
    /// permit is released.
    conn: EngineConnection,
    access: WriteAccess,
    single_statements: SingleStatements,
}

/// SQL texts already known to hold exactly one statement, so they can go through SQLite's
/// prepared-statement cache (which would silently ignore a second statement) from then on.
#[derive(Default)]
pub struct SingleStatements {
    texts: HashSet<String>,
}

impl SingleStatements {
    /// Bound on remembered texts; forgetting only costs a re-check.
    const MAX: usize = 512;

    pub fn contains(&self, sql: &str) -> bool {
        self.texts.contains(sql)
    }

    pub fn insert(&mut self, sql: &str) {
        if self.texts.len() >= Self::MAX {
            self.texts.clear();
        }
        self.texts.insert(sql.to_owned());
    }
}

/// A connection borrowed apart, so a prepared statement (which borrows the SQLite connection)
/// can be admitted and cached.
pub struct ConnectionParts<'a> {
    pub sqlite: &'a rusqlite::Connection,
    pub access: &'a mut WriteAccess,
    pub single_statements: &'a mut SingleStatements,
}

/// The write side of a connection: whether it holds the namespace's write gate.
pub struct WriteAccess {
    permit: Option<WritePermit>,
    shared: Arc<Shared>,
    /// The configuration version whose per-connection pragmas are applied.
    config_seen: Option<u64>,
    /// Raised while the server itself sets guarded PRAGMAs.
    internal: Arc<AtomicBool>,
}

impl Connection {
    /// Wraps a new engine connection and applies the namespace's per-connection settings.
    pub(super) fn new(conn: EngineConnection, shared: Arc<Shared>) -> Result<Self, rusqlite::Error> {
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        let internal = Arc::new(AtomicBool::new(false));
        install_authorizer(&conn, internal.clone());
        let mut conn = Connection {
            conn,
            access: WriteAccess { permit: None, shared, config_seen: None, internal },
            single_statements: SingleStatements::default(),
        };
        conn.access.apply_config(&conn.conn)?;
        Ok(conn)
    }

    pub fn sqlite(&self) -> &rusqlite::Connection {
        &self.conn
    }

    /// Runs every statement of `sql` in order, discarding rows, each admitted like any other
    /// statement; stops at the first error.
    pub fn execute_script(&mut self, sql: &str) -> Result<(), AccessError> {
        let mut statements = rusqlite::Batch::new(&self.conn, sql);
        loop {
            let Some(mut prepared) = statements.next()? else { return Ok(()) };
            // `Batch` does not expose each statement's text; the expanded SQL classifies it.
            let text = prepared.expanded_sql().unwrap_or_default();
            self.access.admit(&self.conn, StmtKind::of(&prepared, &text))?;
            let stepped = (|| -> rusqlite::Result<()> {
                let mut cursor = prepared.raw_query();
                while cursor.next()?.is_some() {}
                Ok(())
            })();
            self.access.settle(&self.conn);
            stepped?;
        }
    }

    pub fn parts(&mut self) -> ConnectionParts<'_> {
        ConnectionParts { sqlite: &self.conn, access: &mut self.access, single_statements: &mut self.single_statements }
    }
}

impl WriteAccess {
    /// Lets a statement of `kind` run, or says why not. A write waits (bounded) for the write
    /// gate unless this connection already holds it.
    pub fn admit(&mut self, conn: &rusqlite::Connection, kind: StmtKind) -> Result<(), AccessError> {
        self.apply_config(conn)?;
        let config = self.shared.config();
        if config.block_reads {
            return Err(AccessError::ReadsBlocked(config.block_reason.clone()));
        }
        if kind == StmtKind::Write {
            if config.block_writes {
                return Err(AccessError::WritesBlocked(config.block_reason.clone()));
            }
            if self.permit.is_none() {
                let permit = self.shared.gate.acquire(self.shared.write_lock_timeout);
                self.permit = Some(permit.ok_or(AccessError::WriteLockTimeout)?);
            }
        }
        Ok(())
    }

    /// Called after every statement: once the transaction has ended, the gate is released,
    /// and a compaction the log asked for may start.
    pub fn settle(&mut self, conn: &rusqlite::Connection) {
        if conn.is_autocommit() && self.permit.take().is_some() {
            self.shared.compact_if_wanted();
        }
    }

    fn apply_config(&mut self, conn: &rusqlite::Connection) -> Result<(), rusqlite::Error> {
        let version = self.shared.config_version.load(Ordering::Acquire);
        if self.config_seen == Some(version) {
            return Ok(());
        }
        let config = self.shared.config();
        // 0 pages means "no limit": SQLite's own maximum.
        let max_pages = if config.max_db_pages == 0 { u32::MAX as u64 - 1 } else { config.max_db_pages };
        self.internal.store(true, Ordering::Relaxed);
        let applied = conn
            .pragma_update(None, "synchronous", synchronous_pragma(&config))
            .and_then(|()| conn.pragma_update(None, "max_page_count", max_pages));
        self.internal.store(false, Ordering::Relaxed);
        applied?;
        self.config_seen = Some(version);
        Ok(())
    }
}

/// True when `sql` starts (after blanks and comments) with `BEGIN IMMEDIATE` or
/// `BEGIN EXCLUSIVE`.
fn begins_write_transaction(sql: &str) -> bool {
    let mut words = SqlWords { rest: sql };
    match words.next() {
        Some(w) if w.eq_ignore_ascii_case("begin") => {}
        _ => return false,
    }
    matches!(words.next(), Some(w) if w.eq_ignore_ascii_case("immediate") || w.eq_ignore_ascii_case("exclusive"))
}

/// The leading keywords of a SQL text, skipping whitespace and comments.
struct SqlWords<'a> {
    rest: &'a str,
}

impl<'a> Iterator for SqlWords<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        loop {
            self.rest = self.rest.trim_start();
            if let Some(after) = self.rest.strip_prefix("--") {
                self.rest = after.split_once('\n').map_or("", |(_, r)| r);
            } else if let Some(after) = self.rest.strip_prefix("/*") {
                self.rest = after.split_once("*/").map_or("", |(_, r)| r);
            } else {
                break;
            }
        }
        let end = self.rest.find(|c: char| !c.is_ascii_alphabetic()).unwrap_or(self.rest.len());
        if end == 0 {
            return None;
        }
        let (word, rest) = self.rest.split_at(end);
        self.rest = rest;
        Some(word)
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_transactions_that_take_the_write_lock_at_once() {
        for sql in ["BEGIN IMMEDIATE", "begin exclusive;", "  -- c\n /* x */ Begin  Immediate Transaction"] {
            assert!(begins_write_transaction(sql), "{sql}");
        }
        for sql in ["BEGIN", "BEGIN DEFERRED", "BEGIN TRANSACTION", "SELECT 1", "", "immediate"] {
            assert!(!begins_write_transaction(sql), "{sql}");
        }
    }
}
