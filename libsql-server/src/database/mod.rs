//! One namespace's SQLite database: how connections are opened, pooled and admitted to write.
//!
//! Everything here blocks (SQLite calls, fsyncs) and is called from blocking threads only.

mod check;
mod connection;
mod functions;
pub mod interrupt;
mod memory;
mod policy;
mod pool;
mod push;
mod rebuild;
mod reset;
mod write_gate;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use libsql_replication::rpc::metadata::{DatabaseConfig, DurabilityMode};
use libsql_sys::rusqlite::{self, OpenFlags};
use libsql_sys::wal::wrapper::WrappedWal;
use libsql_sys::wal::{Sqlite3Wal, Sqlite3WalManager, WalManager};

pub use connection::{Access, AccessError, Connection, ConnectionParts, SingleStatements, StmtKind, WriteAccess};
pub use memory::install as meter_statement_memory;
pub use check::{check_data_file, DataCheck};
pub use rebuild::{replay_checked, RebuildError, Rebuilt};
pub use reset::{Reset, ResetError};
pub use pool::IdleBudget;
use pool::IdlePool;
pub use push::{check_frames, PushError, PushOutcome, PushTarget};
pub use write_gate::{WriteGate, WritePermit};

/// The connection type of the engine: SQLite's WAL wrapped by the replication log's capture.
pub type EngineConnection = libsql_sys::Connection<WrappedWal<ReplicationWal, Sqlite3Wal>>;

use crate::limit_hits::LimitHits;
pub use crate::replication::format::PAGE_SIZE;
use crate::replication::wal::ReplicationWal;
use crate::replication::ReplicationLogger;

/// `--max-idle-connections`' default: idle connections kept across every database beyond
/// each one's own eight.
pub const DEFAULT_IDLE_BUDGET: usize = 256;

/// SQLite's own default: checkpoint once the WAL holds this many frames.
const AUTO_CHECKPOINT_FRAMES: u32 = 1000;

/// How long SQLite itself retries a busy database (a checkpoint racing a reader, say). Writers
/// already queue on the [`WriteGate`]; this is a backstop, not the queue.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The time limits every connection of a database obeys.
#[derive(Debug, Clone)]
pub struct Limits {
    /// How long a writer queues for the write gate.
    pub write_lock_timeout: Duration,
    /// How long one statement may run (`None`: no limit).
    pub statement_timeout: Option<Duration>,
    /// How long a write transaction may hold the gate when the namespace sets no
    /// `txn_timeout_s` (`None`: no limit).
    pub transaction_timeout: Option<Duration>,
    /// The largest string or blob a statement may make (`SQLITE_LIMIT_LENGTH`): what one
    /// value, and one function call's input, may cost in memory.
    pub max_value_size: usize,
    /// Memory one client statement may take from SQLite's allocator (`None`: no limit).
    pub statement_memory: Option<u64>,
    /// Raised when the server shuts down: every running statement stops.
    pub halt: Arc<AtomicBool>,
    /// Where hits of these limits are counted.
    pub hits: Arc<LimitHits>,
    /// Places for idle connections beyond each database's own, shared by every database.
    pub idle_connections: Arc<IdleBudget>,
}

impl Limits {
    /// Limits for tools and tests: no time limits, a 5-second write-lock wait.
    pub fn unlimited() -> Self {
        Limits {
            write_lock_timeout: Duration::from_secs(5),
            statement_timeout: None,
            transaction_timeout: None,
            max_value_size: 1_000_000_000,
            statement_memory: None,
            halt: Arc::new(AtomicBool::new(false)),
            hits: Arc::default(),
            idle_connections: IdleBudget::new(DEFAULT_IDLE_BUDGET),
        }
    }
}

/// State shared by every connection of one database.
pub struct Shared {
    pub gate: Arc<WriteGate>,
    path: PathBuf,
    /// `None` on a replica's copy, which has no log of its own and takes no writes.
    logger: Option<Arc<ReplicationLogger>>,
    compaction: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// When the last compaction attempt was postponed or failed: retries wait a while, so a
    /// long reader or a broken log does not turn every write into a compaction attempt.
    compaction_failed_at: Mutex<Option<std::time::Instant>>,
    config: RwLock<Arc<DatabaseConfig>>,
    /// Bumped by every configuration change, so connections re-apply per-connection pragmas.
    config_version: AtomicU64,
    limits: Limits,
}

impl Shared {
    pub fn config(&self) -> Arc<DatabaseConfig> {
        self.config.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The database's replication log; a replica's copy has none.
    pub fn log(&self) -> Result<&Arc<ReplicationLogger>, crate::replication::LogError> {
        self.logger.as_ref().ok_or(crate::replication::LogError::NoLog)
    }

    /// Starts the compaction the log asked for, unless one is running. Called by a connection
    /// that just released the write gate.
    fn compact_if_wanted(self: &Arc<Self>) {
        let Some(logger) = &self.logger else {
            return;
        };
        if !logger.retire_wanted() || logger.is_poisoned() {
            return;
        }
        let failed_at = *self.compaction_failed_at.lock().unwrap_or_else(|e| e.into_inner());
        if failed_at.is_some_and(|at| at.elapsed() < COMPACTION_RETRY_AFTER) {
            return;
        }
        let mut running = self.compaction.lock().unwrap_or_else(|e| e.into_inner());
        if running.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let shared = self.clone();
        *running = Some(
            std::thread::Builder::new().name("sqld-retire".into()).spawn(move || shared.compact()).expect("spawning a compaction thread"),
        );
    }

    /// Retires the full log and opens the next one (a new generation) with a full image.
    /// Holds the write gate throughout, so the image is exactly the log's last state; writers
    /// queue meanwhile. If readers keep SQLite's WAL from being fully checkpointed, it gives up
    /// and the next write tries again.
    fn compact(&self) {
        let done = self.try_compact();
        *self.compaction_failed_at.lock().unwrap_or_else(|e| e.into_inner()) = (!done).then(std::time::Instant::now);
    }

    fn try_compact(&self) -> bool {
        let Ok(logger) = self.log() else {
            return true;
        };
        let Some(_permit) = self.gate.acquire(COMPACTION_GATE_WAIT) else {
            tracing::warn!(path = %self.path.display(), "compaction postponed: the write lock stayed busy");
            return false;
        };
        match self.checkpoint_fully(1) {
            Ok(true) => match logger.retire_with_image(&self.path) {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!(path = %self.path.display(), error = %e, "compaction failed");
                    false
                }
            },
            Ok(false) => {
                tracing::warn!(path = %self.path.display(), "compaction postponed: readers kept the WAL from a full checkpoint");
                false
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "compaction postponed: checkpoint failed");
                false
            }
        }
    }
}

impl Shared {
    /// With the write gate held: whether SQLite's WAL file has no bytes (or does not exist).
    /// Only writers add to it, and they hold the gate, so it then holds nothing to checkpoint.
    fn wal_is_empty(&self) -> bool {
        match std::fs::metadata(wal_path(&self.path)) {
            Ok(wal) => wal.len() == 0,
            Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        }
    }

    /// With the write gate held: moves all of SQLite's WAL into the data file and empties it,
    /// on a connection of its own, making up to `attempts` tries of waiting
    /// [`CHECKPOINT_READER_WAIT`] for readers. False if readers kept it from finishing.
    fn checkpoint_fully(&self, attempts: usize) -> Result<bool, Error> {
        let conn = open_engine_connection(&self.path, &self.logger)?;
        conn.busy_timeout(CHECKPOINT_READER_WAIT)?;
        for _ in 0..attempts {
            if conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0))? == 0 {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// How long each try at a full checkpoint waits for readers; writers queue meanwhile (the
/// caller holds the write gate), so it is short.
const CHECKPOINT_READER_WAIT: Duration = Duration::from_millis(250);

/// How long after a postponed or failed compaction the next attempt waits.
const COMPACTION_RETRY_AFTER: Duration = Duration::from_secs(10);

/// How long a compaction waits for the write gate before it tries again later.
const COMPACTION_GATE_WAIT: Duration = Duration::from_secs(30);

pub struct Database {
    shared: Arc<Shared>,
    idle: IdlePool<Connection>,
}

#[derive(Debug, Clone, Copy)]
pub enum CheckpointMode {
    /// Copy what it can without waiting for readers (SQLite's PASSIVE).
    Passive,
    /// Copy everything and empty the WAL file (SQLite's TRUNCATE).
    Truncate,
}

impl Database {
    /// Opens (creating if needed) the database file at `path` and checks it can be used.
    /// Every connection's committed transactions go to `logger`.
    pub fn open(path: &Path, config: DatabaseConfig, limits: Limits, logger: Arc<ReplicationLogger>) -> Result<Self, Error> {
        Self::open_with(path, config, limits, Some(logger))
    }

    /// Opens a replica's copy at `path`: reads only, no log (the follower writes the copy).
    pub fn open_replica(path: &Path, config: DatabaseConfig, limits: Limits) -> Result<Self, Error> {
        Self::open_with(path, config, limits, None)
    }

    fn open_with(path: &Path, config: DatabaseConfig, limits: Limits, logger: Option<Arc<ReplicationLogger>>) -> Result<Self, Error> {
        let idle = IdlePool::new(limits.idle_connections.clone());
        let db = Database {
            shared: Arc::new(Shared {
                gate: Arc::new(WriteGate::default()),
                path: path.to_owned(),
                logger,
                compaction: Mutex::new(None),
                compaction_failed_at: Mutex::new(None),
                config: RwLock::new(Arc::new(config)),
                config_version: AtomicU64::new(0),
                limits,
            }),
            idle,
        };
        let conn = db.connection()?;
        db.recycle(conn);
        Ok(db)
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The replication log; `None` on a replica's copy.
    pub fn logger(&self) -> Option<&Arc<ReplicationLogger>> {
        self.shared.logger.as_ref()
    }

    /// The replication log, or why there is none (a replica's copy).
    pub fn log(&self) -> Result<&Arc<ReplicationLogger>, crate::replication::LogError> {
        self.shared.log()
    }

    /// Waits for a running compaction and the snapshots it started (tests, close).
    pub fn wait_for_compaction(&self) {
        let running = self.shared.compaction.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(handle) = running {
            let _ = handle.join();
        }
        if let Some(logger) = &self.shared.logger {
            logger.wait_for_compactions();
        }
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    pub fn config(&self) -> Arc<DatabaseConfig> {
        self.shared.config()
    }

    pub fn set_config(&self, config: DatabaseConfig) {
        *self.shared.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
        self.shared.config_version.fetch_add(1, Ordering::Release);
    }

    /// A connection from the pool, or a new one.
    pub fn connection(&self) -> Result<Connection, Error> {
        if let Some(conn) = self.idle.take() {
            return Ok(conn);
        }
        let conn = open_engine_connection(&self.shared.path, &self.shared.logger)?;
        Ok(Connection::new(conn, self.shared.clone())?)
    }

    /// Gives a connection back. One still inside a transaction is dropped (which rolls the
    /// transaction back) rather than handed to the next user, and so is one whose state client
    /// SQL changed (a per-connection PRAGMA, a temporary table): the pool only holds
    /// connections in the server's known state.
    pub fn recycle(&self, conn: Connection) {
        if !conn.sqlite().is_autocommit() || conn.is_tainted() {
            return;
        }
        conn.interrupt().rearm();
        // One the pool has no room for is closed here, outside its lock.
        drop(self.idle.put(conn));
    }

    /// Closes the idle connections past the database's own that have gone unused for a while
    /// (see `pool`), giving their places in the shared budget back.
    pub fn expire_idle(&self) {
        drop(self.idle.expire(std::time::Instant::now()));
    }

    /// Runs a checkpoint on a connection of the pool. Returns SQLite's (busy, log frames,
    /// checkpointed frames).
    /// A checkpoint that moved the whole WAL into the data file also syncs the data file and
    /// records how far it is durable (see `replication::synced`), so a roll-forward after a
    /// crash replays only the log after that point.
    pub fn checkpoint(&self, mode: CheckpointMode) -> Result<(i64, i64, i64), Error> {
        let conn = self.connection()?;
        let pragma = match mode {
            CheckpointMode::Passive => "PRAGMA wal_checkpoint(PASSIVE)",
            CheckpointMode::Truncate => "PRAGMA wal_checkpoint(TRUNCATE)",
        };
        let position = self.shared.logger.as_ref().and_then(|logger| logger.committed_position());
        let result: (i64, i64, i64) = conn.sqlite().query_row(pragma, [], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))?;
        self.recycle(conn);
        let (busy, wal_frames, checkpointed) = result;
        if let (Some(logger), Some(position)) = (&self.shared.logger, position.filter(|_| busy == 0 && wal_frames == checkpointed)) {
            logger.record_data_synced(&self.shared.path, position);
        }
        Ok(result)
    }

    /// Closes the idle connections after moving the WAL into the data file, so the directory
    /// is self-contained once the namespace is closed.
    pub fn close(&self) -> Result<(), Error> {
        self.wait_for_compaction();
        let result = self.checkpoint(CheckpointMode::Truncate);
        drop(self.idle.drain());
        result.map(|_| ())
    }

    /// Size in bytes of the data file and of SQLite's WAL beside it.
    pub fn file_sizes(&self) -> (u64, u64) {
        let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        (size(&self.shared.path), size(&wal_path(&self.shared.path)))
    }
}

/// SQLite's WAL beside the data file at `data`.
fn wal_path(data: &Path) -> PathBuf {
    let mut wal = data.as_os_str().to_owned();
    wal.push("-wal");
    PathBuf::from(wal)
}

fn open_engine_connection(path: &Path, logger: &Option<Arc<ReplicationLogger>>) -> Result<EngineConnection, Error> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let wal = Sqlite3WalManager::new().wrap(ReplicationWal::new(logger.clone()));
    let conn = EngineConnection::open(path, flags, wal, AUTO_CHECKPOINT_FRAMES, None)?;
    conn.busy_timeout(SQLITE_BUSY_TIMEOUT)?;
    Ok(conn)
}

/// `PRAGMA synchronous` for a configured durability mode. With the default (strong), a commit
/// that was acknowledged survives a power cut, not only a process crash, and SQLite itself
/// does not sync at all (OFF): the replication log fsyncs every transaction before SQLite
/// commits it and always holds the whole database (it opens with a full image), and after a
/// crash recovery rewrites the data file from it wherever they differ. SQLite's own syncs
/// would only write the same pages durably a second time. The data file is synced where the
/// log stops covering it: before a compaction retires the log, and on a clean close. `extra`
/// asks for SQLite's FULL on top.
fn synchronous_pragma(config: &DatabaseConfig) -> &'static str {
    match config.durability_mode.and_then(|m| DurabilityMode::try_from(m).ok()) {
        Some(DurabilityMode::Relaxed) | Some(DurabilityMode::Strong) | None => "OFF",
        Some(DurabilityMode::Extra) => "FULL",
        Some(DurabilityMode::Off) => "OFF",
    }
}
