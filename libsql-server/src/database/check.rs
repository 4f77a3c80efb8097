//! SQLite's own check of a namespace's data file, on a connection of its own: it reads
//! through SQLite's WAL like any reader, so it runs beside the namespace's traffic, and it
//! works on a file the namespace cannot even open.

use std::path::Path;

use libsql_sys::rusqlite::{config::DbConfig, ErrorCode, OpenFlags};
use libsql_sys::wal::Sqlite3WalManager;

/// How much of a data file a check reads through a memory map (the rest by reads).
const CHECK_MMAP_BYTES: i64 = 1 << 30;

/// Lines of SQLite's report kept in a verdict.
const REPORT_LINES: usize = 10;

/// What SQLite said of a data file.
#[derive(Debug, Clone)]
pub struct DataCheck {
    pub ok: bool,
    /// `ok`, the first lines SQLite reported, or why the file could not be read.
    pub message: String,
    /// Whether the verdict is about what the file holds: the check ran, or SQLite refused the
    /// file as corrupt or not a database. False when the check could not run for another
    /// reason (I/O, memory, too many open files): `ok` is then false, but says nothing of
    /// the data.
    pub judged: bool,
}

impl DataCheck {
    fn failed(e: &libsql_sys::rusqlite::Error) -> Self {
        let judged = matches!(e.sqlite_error_code(), Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase));
        DataCheck { ok: false, message: e.to_string(), judged }
    }
}

/// `PRAGMA quick_check` (or `integrity_check` with `full`) of the database file at `path`. A
/// missing file is an empty database, which passes.
pub fn check_data_file(path: &Path, full: bool) -> DataCheck {
    if !path.exists() {
        return DataCheck { ok: true, message: "ok".into(), judged: true };
    }
    match Checker::open(path) {
        Ok(checker) => checker.check(full),
        Err(e) => DataCheck::failed(&e),
    }
}

/// A connection of its own on a data file, for checks (and for holding a snapshot).
pub struct Checker {
    conn: libsql_sys::Connection<libsql_sys::wal::Sqlite3Wal>,
}

impl Checker {
    pub fn open(path: &Path) -> Result<Self, libsql_sys::rusqlite::Error> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = libsql_sys::Connection::open(path, flags, Sqlite3WalManager::new(), 0, None)?;
        // This connection only reads: it never checkpoints, even if it closes last.
        conn.set_db_config(DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, true)?;
        // A check reads every page once: from a memory map, not a read call (and a copy into
        // the page cache) per page. SQLite maps only what its read transaction may read, and
        // no checkpoint writes into or shortens the file under such a reader.
        conn.pragma_update(None, "mmap_size", CHECK_MMAP_BYTES)?;
        Ok(Checker { conn })
    }

    /// Opens a read transaction and keeps it until dropped: the checks see the database as of
    /// now. Begun while SQLite's WAL is empty, it also pins the data file (no checkpoint can
    /// write into it while a reader reads only from it).
    pub fn pin(self) -> Result<Self, libsql_sys::rusqlite::Error> {
        self.conn.execute_batch("BEGIN")?;
        self.conn.query_row("SELECT count(*) FROM sqlite_schema", [], |_| Ok(()))?;
        Ok(self)
    }

    pub fn check(&self, full: bool) -> DataCheck {
        let pragma = if full { "PRAGMA integrity_check" } else { "PRAGMA quick_check" };
        let lines = self.conn.prepare(pragma).and_then(|mut stmt| {
            let rows = stmt.query_map([], |row| row.get::<_, String>(0))?;
            rows.take(REPORT_LINES).collect::<Result<Vec<_>, _>>()
        });
        match lines {
            Ok(lines) if lines == ["ok"] => DataCheck { ok: true, message: "ok".into(), judged: true },
            Ok(lines) => DataCheck { ok: false, message: lines.join("\n"), judged: true },
            Err(e) => DataCheck::failed(&e),
        }
    }
}
