//! `rebuild-data`: the data file rebuilt from the replication log, online. Every log opens
//! with a full image and holds every later transaction, so when the data file is corrupt but
//! the log verifies, the log's replay is the database. It is built in a scratch file,
//! checked, and then written into the live database as one transaction through SQLite's WAL
//! (on a connection whose WAL is not the replication log's: the log does not change, so
//! replicas need nothing). Readers see the old state or the rebuilt one, never a mix.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use libsql_sys::rusqlite::OpenFlags;
use libsql_sys::wal::Sqlite3WalManager;

use super::check::check_data_file;
use super::push::insert_wal_frames;
use super::{Database, PAGE_SIZE};
use crate::replication::format::FRAME_HEADER_SIZE;
use crate::replication::{failpoint, verify, LogError};

/// How long a rebuild waits for the write gate (writers queue behind it meanwhile).
const REBUILD_GATE_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("the replication log does not verify, so the data cannot be rebuilt from it: {0}")]
    LogCorrupt(String),
    #[error("the log's replay fails SQLite's check, so the data file was left as it was: {0}")]
    ReplayCorrupt(String),
    #[error("the namespace is busy: {0}; try again")]
    Busy(&'static str),
    #[error("rebuilding the data failed, and the data file was left as it was: {0}")]
    Failed(String),
}

impl From<LogError> for RebuildError {
    fn from(e: LogError) -> Self {
        RebuildError::Failed(e.to_string())
    }
}

/// What a rebuild made.
#[derive(Debug, Clone)]
pub struct Rebuilt {
    pub pages: u64,
    pub elapsed: Duration,
}

/// The log of `dir` replayed into a scratch directory beside it, checked: the scratch
/// directory (removed when dropped) and the database's size in pages.
pub fn replay_checked(dir: &Path) -> Result<(tempfile::TempDir, u64), RebuildError> {
    verify::check_log(dir).map_err(|e| RebuildError::LogCorrupt(e.to_string()))?;
    let failed = |e: std::io::Error| RebuildError::Failed(e.to_string());
    let scratch = tempfile::Builder::new().prefix(".rebuild-").tempdir_in(dir).map_err(failed)?;
    let path = scratch.path().join("data");
    let file = File::create(&path).map_err(failed)?;
    let pages = verify::replay_into(dir, &file, &path).map_err(|e| RebuildError::LogCorrupt(e.to_string()))?;
    drop(file);
    let check = check_data_file(&path, false);
    if !check.ok {
        return Err(RebuildError::ReplayCorrupt(check.message));
    }
    Ok((scratch, pages))
}

impl Database {
    /// Rebuilds the data file from the replication log (see the module). The replay is
    /// built without the write gate; if a write lands meanwhile, it is built again under it.
    pub fn rebuild_data(&self) -> Result<Rebuilt, RebuildError> {
        let started = Instant::now();
        let dir = self.shared.path.parent().expect("the data file is in its namespace's directory").to_owned();
        let position = self.shared.log()?.position();
        let replayed = replay_checked(&dir)?;
        let _permit = self.shared.gate.acquire(REBUILD_GATE_WAIT).ok_or(RebuildError::Busy("the write lock stayed busy"))?;
        // A write (or a reset) since the replay: replayed again, now that writers wait.
        let (scratch, pages) = if self.shared.log()?.position() == position { replayed } else { replay_checked(&dir)? };
        let image = File::open(scratch.path().join("data")).map_err(|e| RebuildError::Failed(e.to_string()))?;
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = libsql_sys::Connection::open(&self.shared.path, flags, Sqlite3WalManager::new(), 0, None)
            .map_err(|e| RebuildError::Failed(e.to_string()))?;
        let mut page = 0u64;
        insert_wal_frames(&conn, |frame| {
            if page == pages {
                return Ok(false);
            }
            page += 1;
            frame[..FRAME_HEADER_SIZE].fill(0);
            frame[0..4].copy_from_slice(&(page as u32).to_be_bytes());
            if page == pages {
                frame[4..8].copy_from_slice(&(pages as u32).to_be_bytes());
            }
            if page == pages / 2 {
                failpoint::check("rebuild.mid_insert", &self.shared.path).map_err(|e| e.to_string())?;
            }
            image.read_exact_at(&mut frame[FRAME_HEADER_SIZE..], (page - 1) * PAGE_SIZE as u64).map_err(|e| e.to_string()).map(|()| true)
        })
        .map_err(RebuildError::Failed)?;
        // Into the data file too, if no reader holds the WAL (otherwise a later checkpoint does).
        let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        Ok(Rebuilt { pages, elapsed: started.elapsed() })
    }
}
