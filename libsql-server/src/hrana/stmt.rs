//! Running one Hrana statement (`execute`, `describe`, `sequence`) on a connection, and the
//! conversions between Hrana values and SQLite values.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use libsql_hrana::proto::{Col, DescribeCol, DescribeParam, DescribeResult, NamedArg, Row, Stmt, StmtResult, Value};
use libsql_sys::rusqlite::{self, types::{ToSqlOutput, ValueRef}, CachedStatement};

use super::budget::ResponseBudget;
use super::StmtError;
use crate::database::{Connection, ConnectionParts, SingleStatements, WriteAccess};

/// SQL texts stored on a stream by `store_sql`, referred to by `sql_id`.
#[derive(Default)]
pub struct SqlStore {
    texts: HashMap<i32, String>,
    bytes: usize,
}

impl SqlStore {
    /// More than any real client keeps; with `MAX_BYTES`, bounds a stream's (or a socket's)
    /// memory.
    pub const MAX_ENTRIES: usize = 1024;
    pub const MAX_BYTES: usize = 4 << 20;

    pub fn store(&mut self, id: i32, sql: String) -> Result<(), StmtError> {
        let replaced = self.texts.get(&id).map_or(0, String::len);
        if self.texts.len() >= Self::MAX_ENTRIES && !self.texts.contains_key(&id) {
            return Err(StmtError::SqlStoreFull(Self::MAX_ENTRIES));
        }
        if self.bytes - replaced + sql.len() > Self::MAX_BYTES {
            return Err(StmtError::SqlStoreTooLarge(Self::MAX_BYTES));
        }
        self.bytes = self.bytes - replaced + sql.len();
        self.texts.insert(id, sql);
        Ok(())
    }

    pub fn close(&mut self, id: i32) {
        if let Some(sql) = self.texts.remove(&id) {
            self.bytes -= sql.len();
        }
    }

    pub fn resolve<'a>(&'a self, sql: Option<&'a str>, sql_id: Option<i32>) -> Result<&'a str, StmtError> {
        match (sql, sql_id) {
            (Some(sql), None) => Ok(sql),
            (None, Some(id)) => self.texts.get(&id).map(String::as_str).ok_or(StmtError::SqlNotFound(id)),
            (None, None) => Err(StmtError::SqlMissing),
            (Some(_), Some(_)) => Err(StmtError::SqlConflict),
        }
    }
}

/// Prepares the single statement of `sql`: none or more than one is an error. A text seen to
/// hold one statement before comes from the prepared-statement cache.
fn prepare_one<'c>(
    conn: &'c rusqlite::Connection,
    access: &WriteAccess,
    single: &mut SingleStatements,
    sql: &str,
) -> Result<CachedStatement<'c>, StmtError> {
    access.clear_mark();
    if !single.contains(sql) {
        let mut statements = rusqlite::Batch::new(conn, sql);
        statements.next()?.ok_or(StmtError::NoStatement)?;
        match statements.next() {
            // A text the authorizer marked as a hidden write is prepared (and marked) anew
            // each time: a cached statement would skip the authorizer.
            Ok(None) if !access.marked_write() => single.insert(sql),
            Ok(None) => {}
            Ok(Some(_)) | Err(_) => return Err(StmtError::ManyStatements),
        }
    }
    Ok(conn.prepare_cached(sql)?)
}

/// The savepoint around a writing statement that returns rows (`RETURNING`): if its rows
/// overflow the answer, its changes are rolled back with them, so an error never hides a
/// committed write.
const ANSWER_SAVEPOINT: &str = "sqld_answer";

/// Ends the savepoint around a writing statement that returns rows. Undone (the statement
/// failed, or its rows overflow the answer): rolled back, wholly when the savepoint was the
/// transaction (nothing is committed, nothing logged). Kept: released, which commits when the
/// savepoint was the transaction; a release that fails (a deferred constraint, a failed log
/// write) is the statement's error, and leaves no transaction open behind it.
fn end_answer_savepoint(sqlite: &rusqlite::Connection, was_autocommit: bool, overflow: bool, stepped: rusqlite::Result<()>) -> rusqlite::Result<()> {
    if overflow || stepped.is_err() {
        let undo = if was_autocommit { "ROLLBACK".to_owned() } else { format!("ROLLBACK TO {ANSWER_SAVEPOINT}; RELEASE {ANSWER_SAVEPOINT}") };
        // Fails only when the transaction is already gone (an interrupt rolled it back).
        let _ = sqlite.execute_batch(&undo);
        return stepped;
    }
    if let Err(e) = sqlite.execute_batch(&format!("RELEASE {ANSWER_SAVEPOINT}")) {
        if was_autocommit && !sqlite.is_autocommit() {
            let _ = sqlite.execute_batch("ROLLBACK");
        }
        return Err(e);
    }
    Ok(())
}

/// Executes one statement and collects its result.
pub fn execute(conn: &mut Connection, sqls: &SqlStore, budget: &mut ResponseBudget, stmt: &Stmt) -> Result<StmtResult, StmtError> {
    let sql = sqls.resolve(stmt.sql.as_deref(), stmt.sql_id)?;
    let started = Instant::now();
    let ConnectionParts { sqlite, access, single_statements } = conn.parts();
    let mut prepared = prepare_one(sqlite, access, single_statements, sql)?;
    bind_args(&mut prepared, &stmt.args, &stmt.named_args)?;

    let kind = access.kind_of(&prepared, sql);
    access.admit(sqlite, kind)?;
    let want_rows = stmt.want_rows.unwrap_or(true);
    let column_count = prepared.column_count();
    let guarded = want_rows && column_count > 0 && !prepared.readonly();
    let was_autocommit = sqlite.is_autocommit();
    let changes_before = total_changes(sqlite);
    let mut rows = Vec::new();
    let mut over_budget = None;
    let budget_mark = budget.used();
    let stepped = (|| -> rusqlite::Result<()> {
        if guarded {
            sqlite.execute_batch(&format!("SAVEPOINT {ANSWER_SAVEPOINT}"))?;
        }
        let mut cursor = prepared.raw_query();
        while let Some(row) = cursor.next()? {
            if want_rows {
                // Charged before anything is copied out of SQLite.
                let size = (0..column_count).map(|i| row.get_ref(i).map(ResponseBudget::value_size)).sum::<Result<usize, _>>()?;
                if let Err(e) = budget.charge(size) {
                    over_budget = Some(e);
                    break;
                }
                let values = (0..column_count).map(|i| row.get_ref(i).map(value_from_sqlite)).collect::<Result<_, _>>()?;
                rows.push(Row { values });
            }
        }
        Ok(())
    })();
    let stepped = if guarded { end_answer_savepoint(sqlite, was_autocommit, over_budget.is_some(), stepped) } else { stepped };
    // Rows of a statement that failed are not in the answer: their charge is given back.
    let outcome = access.finish(sqlite, stepped).map_err(StmtError::from).and_then(|()| over_budget.map_or(Ok(()), |e| Err(e.into())));
    if let Err(e) = outcome {
        budget.rewind(budget_mark);
        return Err(e);
    }

    let cols = prepared
        .columns()
        .into_iter()
        .map(|c| Col { name: Some(c.name().to_owned()), decltype: c.decl_type().map(str::to_owned) })
        .collect();
    // SQLite's counters keep the last change of the connection (pooled, so maybe another
    // request's): a statement that changed no row (DDL, a read) reports none of it.
    let changed = total_changes(sqlite) != changes_before;
    Ok(StmtResult {
        cols,
        rows,
        affected_row_count: if changed { sqlite.changes() } else { 0 },
        last_insert_rowid: changed.then(|| sqlite.last_insert_rowid()),
        replication_index: None,
        rows_read: 0,
        rows_written: 0,
        query_duration_ms: started.elapsed().as_secs_f64() * 1000.0,
    })
}

/// Rows changed on `conn` since it opened (SQLite's `total_changes`).
fn total_changes(conn: &rusqlite::Connection) -> i64 {
    // SAFETY: the handle is the open connection's, used on its own thread.
    unsafe { rusqlite::ffi::sqlite3_total_changes64(conn.handle()) }
}

/// Describes a statement without running it: its parameters and result columns.
pub fn describe(conn: &mut Connection, sqls: &SqlStore, sql: Option<&str>, sql_id: Option<i32>) -> Result<DescribeResult, StmtError> {
    let sql = sqls.resolve(sql, sql_id)?;
    let ConnectionParts { sqlite, access, single_statements } = conn.parts();
    let prepared = prepare_one(sqlite, access, single_statements, sql)?;
    let params = (1..=prepared.parameter_count())
        .map(|i| DescribeParam { name: prepared.parameter_name(i).map(str::to_owned) })
        .collect();
    let cols = prepared
        .columns()
        .into_iter()
        .map(|c| DescribeCol { name: c.name().to_owned(), decltype: c.decl_type().map(str::to_owned) })
        .collect();
    Ok(DescribeResult { params, cols, is_explain: prepared.is_explain() != 0, is_readonly: prepared.readonly() })
}

/// Runs every statement of a SQL text in order, discarding rows; stops at the first error.
pub fn sequence(conn: &mut Connection, sqls: &SqlStore, sql: Option<&str>, sql_id: Option<i32>) -> Result<(), StmtError> {
    let sql = sqls.resolve(sql, sql_id)?;
    Ok(conn.execute_script(sql)?)
}

fn bind_args(stmt: &mut rusqlite::Statement<'_>, args: &[Value], named: &[NamedArg]) -> Result<(), StmtError> {
    let count = stmt.parameter_count();
    if args.len() > count {
        return Err(StmtError::ArgsInvalid(format!("{} arguments given, the statement takes {count}", args.len())));
    }
    for (i, value) in args.iter().enumerate() {
        stmt.raw_bind_parameter(i + 1, value_to_sqlite(value)?)?;
    }
    for arg in named {
        let index = named_index(stmt, &arg.name)?
            .ok_or_else(|| StmtError::ArgsInvalid(format!("the statement has no parameter named {:?}", arg.name)))?;
        stmt.raw_bind_parameter(index, value_to_sqlite(&arg.value)?)?;
    }
    Ok(())
}

/// Finds a named parameter. Clients send the name with its prefix (`:a`, `@a`, `$a`) or
/// without it; try the name as given, then with each prefix.
fn named_index(stmt: &rusqlite::Statement<'_>, name: &str) -> Result<Option<usize>, StmtError> {
    if let Some(i) = stmt.parameter_index(name)? {
        return Ok(Some(i));
    }
    if name.starts_with([':', '@', '$']) {
        return Ok(None);
    }
    for prefix in [':', '@', '$'] {
        if let Some(i) = stmt.parameter_index(&format!("{prefix}{name}"))? {
            return Ok(Some(i));
        }
    }
    Ok(None)
}

pub fn value_to_sqlite(value: &Value) -> Result<ToSqlOutput<'_>, StmtError> {
    Ok(ToSqlOutput::Borrowed(match value {
        Value::None => return Err(StmtError::ArgsInvalid("a value without a type".into())),
        Value::Null => ValueRef::Null,
        Value::Integer { value } => ValueRef::Integer(*value),
        Value::Float { value } => ValueRef::Real(*value),
        Value::Text { value } => ValueRef::Text(value.as_bytes()),
        Value::Blob { value } => ValueRef::Blob(value),
    }))
}

pub fn value_from_sqlite(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(value) => Value::Integer { value },
        ValueRef::Real(value) => Value::Float { value },
        ValueRef::Text(text) => Value::Text { value: Arc::from(String::from_utf8_lossy(text)) },
        ValueRef::Blob(blob) => Value::Blob { value: Bytes::copy_from_slice(blob) },
    }
}
