//! The replication log of a primary namespace, byte-compatible with the libSQL server's.
//!
//! * [`wal::ReplicationWal`] wraps SQLite's WAL on every primary connection and hands each
//!   transaction to the namespace's [`ReplicationLogger`], which appends it to `wallog` and
//!   fsyncs it before SQLite commits: the log is the durable record of every commit.
//! * A log past `--max-log-size` or `--max-log-duration` is retired to `to_compact/` and a
//!   fresh log continues; [`compaction`] turns the retired log into `snapshots/*.snap` off the
//!   write path.
//! * [`recovery`] decides at open whether the log can be trusted (`.sentinel`, missing or old
//!   log); after a crash it rolls the data file forward from the log, then rebuilds the log
//!   from the data file.
//! * [`feed`] serves replicas of the older protocol (gRPC): frames from a frame_no, and the
//!   log's opening image as the snapshot.
//! * [`verify`] walks log and snapshots, and replays them to compare with the data file.

pub mod compaction;
pub mod failpoint;
pub mod feed;
pub mod format;
pub mod generation;
mod image;
mod logger;
mod pagecache;
pub mod recovery;
pub mod sync;
pub mod synced;
pub mod verify;
pub mod wal;

use std::path::{Path, PathBuf};

use libsql_sys::rusqlite;

pub use logger::{LogPosition, LogSettings, LogStats, PreparedReset, ReplicationLogger};
pub use recovery::{Rebuild, RecoveryOptions};

/// The SQLite database file of a namespace, and SQLite's own WAL beside it.
pub const DATA: &str = "data";
pub const DATA_WAL: &str = "data-wal";
pub const WALLOG: &str = "wallog";
/// A new log beside the current one while a retire swaps them.
pub const WALLOG_NEW: &str = "wallog.new";
/// A rebuilt log being written beside the current one.
pub const WALLOG_REBUILD: &str = "wallog.rebuild";
pub const SNAPSHOTS_DIR: &str = "snapshots";
pub const TO_COMPACT_DIR: &str = "to_compact";
/// How the snapshots and retired logs of a log a reset replaced begin their names once moved
/// aside, to be removed without the write gate (freeing their blocks takes a while).
pub const DROPPED_PREFIX: &str = ".dropped-";
pub const SENTINEL: &str = ".sentinel";
/// Beside a log that holds frames of a transaction that did not commit and could not be
/// discarded: recovery must not roll the data file forward from it.
pub const LOG_UNTRUSTED: &str = ".log-untrusted";

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{} is corrupt{}: {what}", path.display(), frame_no.map(|f| format!(" at frame_no {f}")).unwrap_or_default())]
    Corrupt { path: PathBuf, frame_no: Option<u64>, what: String },
    #[error("the replication log is broken ({0}); writes are refused until it is rebuilt")]
    Poisoned(String),
    #[error("the rebuild of the log was abandoned before its swap: {0}")]
    Abandoned(String),
    #[error("the namespace was closed; its log takes no more writes")]
    Closed,
    #[error("{}: {1}", .0.display())]
    Sqlite(PathBuf, rusqlite::Error),
    #[error("{}: SQLite's WAL could not be fully checkpointed: the database is in use", .0.display())]
    CheckpointBusy(PathBuf),
    #[error("this namespace is a replica's copy: it has no replication log of its own")]
    NoLog,
}

impl LogError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        LogError::Io { path: path.to_owned(), source }
    }

    pub(crate) fn corrupt(path: &Path, frame_no: Option<u64>, what: impl Into<String>) -> Self {
        LogError::Corrupt { path: path.to_owned(), frame_no, what: what.into() }
    }
}
