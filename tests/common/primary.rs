//! A primary namespace opened in-process the way the server opens one (recovery, then the
//! database with its log), for tests of the replication log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use libsql_server::database::{Database, Limits};
use libsql_server::namespace::DatabaseConfig;
use libsql_server::replication::verify::{compare_with_data, Comparison};
use libsql_server::replication::{recovery, LogSettings, RecoveryOptions, ReplicationLogger, Rebuild};

pub struct Primary {
    pub dir: PathBuf,
    pub db: Option<Database>,
    pub rebuild: Option<Rebuild>,
    pub options: RecoveryOptions,
}

impl Primary {
    pub fn open(dir: &Path, settings: LogSettings, options: RecoveryOptions) -> Primary {
        std::fs::create_dir_all(dir).unwrap();
        let data = dir.join("data");
        let (logger, rebuild) = recovery::open(dir, &data, settings, options).unwrap();
        let db = Database::open(&data, DatabaseConfig::default(), Limits::unlimited(), logger).unwrap();
        Primary { dir: dir.to_owned(), db: Some(db), rebuild, options }
    }

    pub fn db(&self) -> &Database {
        self.db.as_ref().unwrap()
    }

    pub fn logger(&self) -> &Arc<ReplicationLogger> {
        self.db().log().expect("a primary has a log")
    }

    /// Runs statements as the server does: each admitted (write lock, compaction trigger).
    pub fn exec(&self, sql: &str) {
        self.try_exec(sql).unwrap();
    }

    pub fn try_exec(&self, sql: &str) -> Result<(), libsql_server::database::AccessError> {
        let mut conn = self.db().connection().unwrap();
        let result = conn.execute_script(sql);
        self.db().recycle(conn);
        result
    }

    pub fn count(&self, sql: &str) -> i64 {
        let conn = self.db().connection().unwrap();
        let n = conn.sqlite().query_row(sql, [], |r| r.get(0)).unwrap();
        self.db().recycle(conn);
        n
    }

    /// A clean close: checkpoint, log synced, sentinel removed.
    pub fn close(mut self) {
        let db = self.db.take().unwrap();
        db.close().unwrap();
        recovery::close(db.log().unwrap(), self.options).unwrap();
    }

    /// A crash as far as the log can tell: everything dropped, nothing marked clean. The
    /// background threads a real crash would stop are waited for (failpoints stop them where
    /// a test wants), so they cannot race the next open.
    pub fn crash(mut self) {
        let db = self.db.take().unwrap();
        db.wait_for_compaction();
        drop(db);
    }

    /// `PRAGMA integrity_check`'s first row.
    pub fn integrity(&self) -> String {
        let conn = self.db().connection().unwrap();
        let result = conn.sqlite().query_row("PRAGMA integrity_check", [], |r| r.get(0)).unwrap();
        self.db().recycle(conn);
        result
    }

    pub fn assert_replay_equals_data(&self) {
        self.db().wait_for_compaction();
        match compare_with_data(&self.dir, &self.dir.join("data")).unwrap() {
            Comparison::Equal { .. } => {}
            other => panic!("replay differs from data: {other:?}"),
        }
    }
}

pub fn no_compaction() -> LogSettings {
    LogSettings::default()
}

pub fn compact_every(frames: u64) -> LogSettings {
    LogSettings { max_log_frames: Some(frames), max_log_duration: None }
}

/// Little-endian fields of the log's on-disk layout, read independently of the server's code.
pub fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

pub fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
