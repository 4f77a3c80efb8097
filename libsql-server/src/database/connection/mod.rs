//! A connection of one namespace, with the rules every statement passes before it runs:
//! the namespace's read/write blocks and the write gate.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use libsql_sys::rusqlite::{self, config::DbConfig, limits::Limit as SqliteLimit, ErrorCode};

use super::functions;
use super::interrupt::{self, Interrupt, Reason};
use super::memory::Meter;
use super::policy::{self, PolicyState};
use super::{synchronous_pragma, EngineConnection, Shared, WritePermit};
use crate::limit_hits::{Limit, Refusal};

mod classify;

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
    /// `marked` is the authorizer's word for a write behind a read-only face.
    fn of(stmt: &rusqlite::Statement<'_>, sql: &str, marked: bool) -> Self {
        if marked || !stmt.readonly() || begins_write_transaction(sql) {
            StmtKind::Write
        } else {
            StmtKind::Read
        }
    }
}

/// What the client using a connection may do: read only, or read and write (its credential's
/// grant on the namespace; see `auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// Pages the temporary database of a connection may hold (temporary tables and indexes).
const TEMP_MAX_PAGES: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("reads are blocked on this namespace{}", reason_suffix(.0))]
    ReadsBlocked(Option<String>),
    #[error("writes are blocked on this namespace{}", reason_suffix(.0))]
    WritesBlocked(Option<String>),
    #[error("the credential grants read-only access to this namespace: writes are refused")]
    ReadOnly,
    #[error("timed out waiting for the namespace's write lock (another transaction is writing)")]
    WriteLockTimeout,
    #[error("{}", interrupted_message(.0))]
    Interrupted(Reason),
    #[error("the statement needed more than {0} bytes of memory (--max-statement-memory); read fewer or smaller values at a time")]
    MemoryLimit(u64),
    #[error("the database reached its size limit ({max_pages} pages of 4096 bytes, max_db_size): {source}")]
    QuotaExceeded { max_pages: u64, source: rusqlite::Error },
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

fn interrupted_message(reason: &Reason) -> String {
    match reason {
        Reason::StatementTimeout(limit) => {
            format!("the statement was stopped after running for {limit:?} (the server's statement time limit)")
        }
        Reason::TransactionTimeout(limit) => {
            format!("the transaction held the write lock for more than {limit:?} (txn_timeout_s) and was rolled back")
        }
        Reason::ClientGone => "the client went away; the statement was stopped".into(),
        Reason::ShuttingDown => "the server is shutting down; the statement was stopped".into(),
    }
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
    /// What the authorizer knows of this connection (see `policy`).
    policy: Arc<PolicyState>,
    interrupt: Arc<Interrupt>,
    meter: Arc<Meter>,
    /// The current client's grant: a read-only one never takes the write gate.
    access: Access,
}

impl Connection {
    /// Wraps a new engine connection and applies the namespace's per-connection settings.
    pub(super) fn new(conn: EngineConnection, shared: Arc<Shared>) -> Result<Self, rusqlite::Error> {
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);
        let policy = Arc::new(PolicyState::default());
        conn.authorizer(Some(policy::authorizer(policy.clone())));
        let interrupt = Arc::new(Interrupt::new(shared.limits.halt.clone()));
        let check = interrupt.clone();
        conn.progress_handler(interrupt::CHECK_EVERY_OPS, Some(move || check.reason().is_some()));
        // Functions whose one call could outrun the handler above, replaced by bounded ones.
        functions::install(&conn, &interrupt)?;
        // Defensive mode: no writable schema, no raw page writes, no journal_mode=OFF, even
        // through paths the authorizer does not see. One attached database at most: the
        // scratch copy VACUUM attaches (client ATTACH is refused by the authorizer). No
        // sorter threads: a client's sort runs on its own request's thread.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_DEFENSIVE, true)?;
        conn.set_limit(SqliteLimit::SQLITE_LIMIT_ATTACHED, 1);
        conn.set_limit(SqliteLimit::SQLITE_LIMIT_WORKER_THREADS, 0);
        // One value (and so one function call's input) is bounded: memory per statement.
        conn.set_limit(SqliteLimit::SQLITE_LIMIT_LENGTH, i32::try_from(shared.limits.max_value_size).unwrap_or(i32::MAX));
        // No write commits without the write gate, whichever path it took.
        let gate = policy.clone();
        conn.commit_hook(Some(move || !gate.holds_gate.load(Ordering::Relaxed)));
        // Temporary tables are bounded like the database (they are not its quota).
        policy.internal.store(true, Ordering::Relaxed);
        let temp = conn.pragma_update(Some(rusqlite::DatabaseName::Temp), "max_page_count", TEMP_MAX_PAGES);
        policy.internal.store(false, Ordering::Relaxed);
        temp?;
        let mut conn = Connection {
            conn,
            access: WriteAccess { permit: None, shared, config_seen: None, policy, interrupt, meter: Arc::default(), access: Access::ReadWrite },
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
            self.access.clear_mark();
            let Some(mut prepared) = statements.next()? else {
                return Ok(());
            };
            // `Batch` does not expose each statement's text; the expanded SQL classifies it.
            let text = prepared.expanded_sql().unwrap_or_default();
            let kind = self.access.kind_of(&prepared, &text);
            self.access.admit(&self.conn, kind)?;
            let stepped = (|| -> rusqlite::Result<()> {
                let mut cursor = prepared.raw_query();
                while cursor.next()?.is_some() {}
                Ok(())
            })();
            self.access.finish(&self.conn, stepped)?;
        }
    }

    /// True once client SQL changed this connection's own state: it must not be pooled.
    pub fn is_tainted(&self) -> bool {
        self.access.policy.tainted.load(Ordering::Relaxed)
    }

    /// What stops this connection's statements (the request's client going away, say).
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.access.interrupt
    }

    /// True when this connection holds the write lock past its transaction's time limit.
    pub fn transaction_expired(&self) -> bool {
        self.access.permit.is_some() && self.access.interrupt.transaction_expired()
    }

    /// The push path holds the gate itself while it inserts frames on this connection.
    pub(super) fn set_gate_held(&self, held: bool) {
        self.access.policy.holds_gate.store(held, Ordering::Relaxed);
    }

    /// What the client using this connection may do (read-only grants never write).
    pub fn set_access(&mut self, access: Access) {
        self.access.set_access(access);
    }

    /// What the client using this connection may do.
    pub fn access(&self) -> Access {
        self.access.access
    }

    pub fn parts(&mut self) -> ConnectionParts<'_> {
        ConnectionParts { sqlite: &self.conn, access: &mut self.access, single_statements: &mut self.single_statements }
    }
}

impl WriteAccess {
    /// Whether a statement just prepared needs the write gate. Takes the authorizer's mark,
    /// so call it once per preparation.
    pub fn kind_of(&self, stmt: &rusqlite::Statement<'_>, sql: &str) -> StmtKind {
        StmtKind::of(stmt, sql, self.policy.wants_gate.swap(false, Ordering::Relaxed))
    }

    /// Sets what the client using this connection may do, for its statements from now on.
    pub fn set_access(&mut self, access: Access) {
        self.access = access;
    }

    /// Forgets a mark left by a preparation that did not run (a `describe`, a refused text):
    /// called before each preparation.
    pub fn clear_mark(&self) {
        self.policy.wants_gate.store(false, Ordering::Relaxed);
    }

    /// True when the statement last prepared was marked as a write SQLite calls read-only:
    /// it must be prepared (and so marked) again each time, never served from a cache.
    pub fn marked_write(&self) -> bool {
        self.policy.wants_gate.load(Ordering::Relaxed)
    }

    /// Lets a statement of `kind` run, or says why not. A write waits (bounded) for the write
    /// gate unless this connection already holds it.
    pub fn admit(&mut self, conn: &rusqlite::Connection, kind: StmtKind) -> Result<(), AccessError> {
        // Per-connection settings change between transactions (SQLite refuses a new
        // `synchronous` inside one); an open transaction finishes under the old ones.
        if conn.is_autocommit() {
            self.apply_config(conn)?;
        }
        if self.permit.is_some() && self.interrupt.transaction_expired() {
            // A transaction past its limit goes no further, however short its statements.
            let limit = self.interrupt.transaction_limit();
            self.roll_back(conn);
            self.hit(Reason::TransactionTimeout(limit));
            return Err(AccessError::Interrupted(Reason::TransactionTimeout(limit)));
        }
        let config = self.shared.config();
        if config.block_reads {
            return Err(AccessError::ReadsBlocked(config.block_reason.clone()));
        }
        // Inside a write transaction (begun under another grant on this stream), a read-only
        // grant does nothing, not even COMMIT: closing the stream rolls the transaction back.
        if self.access == Access::ReadOnly && self.permit.is_some() {
            return Err(self.refuse_write());
        }
        if kind == StmtKind::Write {
            if self.access == Access::ReadOnly {
                return Err(self.refuse_write());
            }
            if config.block_writes {
                return Err(AccessError::WritesBlocked(config.block_reason.clone()));
            }
            if self.permit.is_none() {
                self.take_gate(&config)?;
            }
        }
        self.interrupt.start_statement(self.shared.limits.statement_timeout);
        self.meter.enter(self.shared.limits.statement_memory);
        self.policy.stepping.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn take_gate(&mut self, config: &super::DatabaseConfig) -> Result<(), AccessError> {
        self.take_gate_within(config, self.shared.limits.write_lock_timeout)
    }

    fn take_gate_now(&mut self, config: &super::DatabaseConfig) -> Result<(), AccessError> {
        self.take_gate_within(config, Duration::ZERO)
    }

    fn take_gate_within(&mut self, config: &super::DatabaseConfig, wait: Duration) -> Result<(), AccessError> {
        let permit = self.shared.gate.acquire(wait);
        self.permit = Some(permit.ok_or(AccessError::WriteLockTimeout)?);
        self.policy.holds_gate.store(true, Ordering::Relaxed);
        self.interrupt.start_transaction(self.transaction_timeout(config));
        Ok(())
    }

    /// Rolls back the open transaction and releases the gate.
    fn roll_back(&mut self, conn: &rusqlite::Connection) {
        self.interrupt.end_transaction();
        if !conn.is_autocommit() {
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "rolling back a transaction (past its time limit, or without the write lock) failed");
            }
        }
        self.release_if_done(conn);
    }

    /// Once the transaction has ended: releases the gate, and a compaction the log asked for
    /// may start.
    fn release_if_done(&mut self, conn: &rusqlite::Connection) {
        if conn.is_autocommit() && self.permit.take().is_some() {
            self.policy.holds_gate.store(false, Ordering::Relaxed);
            self.interrupt.end_transaction();
            self.shared.compact_if_wanted();
        }
    }

    /// Called after every admitted statement with the outcome of stepping it: says why an
    /// interrupted statement stopped, rolls back a transaction past its time limit, and once
    /// the transaction has ended releases the gate (a compaction the log asked for may start).
    pub fn finish<T>(&mut self, conn: &rusqlite::Connection, stepped: rusqlite::Result<T>) -> Result<T, AccessError> {
        self.policy.stepping.store(false, Ordering::Relaxed);
        self.meter.leave();
        let result = stepped.map_err(|e| self.classify(e));
        self.interrupt.end_statement();
        if matches!(result, Err(AccessError::Interrupted(Reason::TransactionTimeout(_)))) {
            self.roll_back(conn);
            return result;
        }
        // A statement classified as a read that left a write transaction open (SQLite's own
        // word, whatever the text looked like) holds SQLite's write lock: it takes the gate
        // too, or gives the lock back.
        // It does not wait for the gate while it holds SQLite's lock (the gate's holder would
        // wait on that lock in turn): the gate is free now, or the write is rolled back.
        if self.permit.is_none() && write_transaction_open(conn) {
            let config = self.shared.config();
            let refused = if self.access == Access::ReadOnly {
                Some(self.refuse_write())
            } else if config.block_writes {
                Some(AccessError::WritesBlocked(config.block_reason.clone()))
            } else {
                self.take_gate_now(&config).err()
            };
            if let Some(e) = refused {
                self.roll_back(conn);
                return Err(e);
            }
        }
        self.release_if_done(conn);
        result
    }

    /// A write on a read-only grant: counted with the other authentication refusals.
    fn refuse_write(&self) -> AccessError {
        self.shared.limits.hits.refuse(Refusal::ReadOnly, format_args!("{}: a write on a read-only grant", self.shared.path.display()));
        AccessError::ReadOnly
    }

    fn hit(&self, reason: Reason) {
        let hits = &self.shared.limits.hits;
        let db = self.shared.path.display();
        match reason {
            Reason::StatementTimeout(limit) => hits.hit(Limit::StatementTimeout, format_args!("{db}: statement ran past {limit:?}")),
            Reason::TransactionTimeout(limit) => {
                hits.hit(Limit::TransactionTimeout, format_args!("{db}: transaction held the write lock past {limit:?}"))
            }
            Reason::ClientGone | Reason::ShuttingDown => {}
        }
    }

    /// An engine error as the client should see it: an interrupt with its reason, a full
    /// database as the namespace's quota when it has one.
    fn classify(&self, e: rusqlite::Error) -> AccessError {
        match e.sqlite_error_code() {
            Some(ErrorCode::OutOfMemory) if self.meter.exceeded() => {
                let limit = self.shared.limits.statement_memory.unwrap_or_default();
                let db = self.shared.path.display();
                self.shared.limits.hits.hit(Limit::StatementMemory, format_args!("{db}: a statement needed more than {limit} bytes"));
                AccessError::MemoryLimit(limit)
            }
            Some(ErrorCode::OperationInterrupted) => match self.interrupt.reason() {
                Some(reason) => {
                    self.hit(reason);
                    AccessError::Interrupted(reason)
                }
                None => AccessError::Sqlite(e),
            },
            // SQLITE_FULL is the namespace's quota unless the disk itself is (nearly) full.
            Some(ErrorCode::DiskFull) => match self.shared.config().max_db_pages {
                max_pages if max_pages > 0 && !disk_nearly_full(&self.shared.path) => {
                    let db = self.shared.path.display();
                    self.shared.limits.hits.hit(Limit::DatabaseSize, format_args!("{db}: {max_pages} pages"));
                    AccessError::QuotaExceeded { max_pages, source: e }
                }
                _ => AccessError::Sqlite(e),
            },
            _ => AccessError::Sqlite(e),
        }
    }

    /// How long a write transaction may hold the gate: the namespace's `txn_timeout_s`, else
    /// the server's default; 0 means no limit.
    fn transaction_timeout(&self, config: &super::DatabaseConfig) -> Option<Duration> {
        match config.txn_timeout_s {
            Some(0) => None,
            Some(secs) => Some(Duration::from_secs(secs)),
            None => self.shared.limits.transaction_timeout,
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
        self.policy.internal.store(true, Ordering::Relaxed);
        let applied = conn
            .pragma_update(None, "synchronous", synchronous_pragma(&config))
            .and_then(|()| conn.pragma_update(None, "max_page_count", max_pages));
        self.policy.internal.store(false, Ordering::Relaxed);
        applied?;
        self.config_seen = Some(version);
        Ok(())
    }
}

/// Whether the connection has a write transaction open on any of its databases.
fn write_transaction_open(conn: &rusqlite::Connection) -> bool {
    // SAFETY: the handle is valid while `conn` lives; a null schema asks about all of them.
    unsafe { rusqlite::ffi::sqlite3_txn_state(conn.handle(), std::ptr::null()) == rusqlite::ffi::SQLITE_TXN_WRITE }
}

/// Free space below which a full database is blamed on the disk, not the quota.
const DISK_FULL_MARGIN: u64 = 64 << 20;

/// Whether the filesystem holding `path` has less than [`DISK_FULL_MARGIN`] free.
fn disk_nearly_full(path: &std::path::Path) -> bool {
    let Some(dir) = path.parent().and_then(|d| std::ffi::CString::new(d.as_os_str().as_encoded_bytes()).ok()) else {
        return false;
    };
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a zeroed struct the call fills.
    if unsafe { libc::statvfs(dir.as_ptr(), &mut stat) } != 0 {
        return false;
    }
    (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64) < DISK_FULL_MARGIN
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
            // Empty statements (`;`) before the first one do not count.
            self.rest = self.rest.trim_start_matches(|c: char| c.is_whitespace() || c == ';');
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
        for sql in ["BEGIN IMMEDIATE", "begin exclusive;", "  -- c\n /* x */ Begin  Immediate Transaction", ";;BEGIN IMMEDIATE"] {
            assert!(begins_write_transaction(sql), "{sql}");
        }
        for sql in ["BEGIN", "BEGIN DEFERRED", "BEGIN TRANSACTION", "SELECT 1", "", "immediate"] {
            assert!(!begins_write_transaction(sql), "{sql}");
        }
    }
}
