//! `reset-replication`: a new replication log built from the live data file, online. The data
//! file is checked first; nothing changes if it fails the check.

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::check::{check_data_file, DataCheck};
use super::{open_engine_connection, Database, Error};
use crate::replication::LogError;

/// How long a reset waits for the write gate (writers queue behind it meanwhile).
const RESET_GATE_WAIT: Duration = Duration::from_secs(30);
/// How long each attempt at a full checkpoint waits for readers, and how many attempts.
const READER_WAIT: Duration = Duration::from_millis(250);
const CHECKPOINT_ATTEMPTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("the namespace is busy: {0}; try again")]
    Busy(&'static str),
    #[error("the namespace cannot be opened, so its log cannot be rebuilt from it (run integrity-check): {0}")]
    Unopenable(String),
    #[error("the live data fails SQLite's check, so the log was left as it was: {0}")]
    DataCorrupt(String),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    Database(#[from] Error),
}

/// What a reset made.
#[derive(Debug, Clone)]
pub struct Reset {
    pub old_log_id: Uuid,
    pub log_id: Uuid,
    pub generation: u64,
    pub pages: u64,
    pub elapsed: Duration,
}

impl Database {
    /// Rebuilds the namespace's replication log from its data file (see
    /// `ReplicationLogger::reset_from_data`) under the write gate: writers wait, readers do
    /// not. SQLite's WAL is checkpointed into the data file first, and the file must pass
    /// `PRAGMA quick_check`.
    pub fn reset_replication(&self) -> Result<Reset, ResetError> {
        let started = Instant::now();
        let shared = &self.shared;
        let _permit = shared.gate.acquire(RESET_GATE_WAIT).ok_or(ResetError::Busy("the write lock stayed busy"))?;
        if let Err(e) = self.checkpoint_fully() {
            // A data file SQLite cannot even checkpoint is judged by the check.
            let check = check_data_file(&shared.path, false);
            return Err(if check.ok { e } else { ResetError::DataCorrupt(check.message) });
        }
        let old_log_id = shared.logger.log_id();
        // The check runs beside the new log's image (the gate keeps the file still); the new
        // log is swapped in only if the data passed it.
        let reset = std::thread::scope(|scope| {
            let checker = scope.spawn(|| check_data_file(&shared.path, false));
            shared.logger.reset_from_data(&shared.path, || {
                let check = checker.join().unwrap_or_else(|_| DataCheck { ok: false, message: "the check panicked".into() });
                if check.ok {
                    Ok(())
                } else {
                    Err(LogError::Abandoned(check.message))
                }
            })
        });
        let (log_id, generation, pages) = match reset {
            Err(LogError::Abandoned(message)) => return Err(ResetError::DataCorrupt(message)),
            other => other?,
        };
        Ok(Reset { old_log_id, log_id, generation, pages, elapsed: started.elapsed() })
    }

    /// Moves all of SQLite's WAL into the data file, waiting a little for readers each try.
    fn checkpoint_fully(&self) -> Result<(), ResetError> {
        let conn = open_engine_connection(&self.shared.path, &self.shared.logger)?;
        conn.busy_timeout(READER_WAIT).map_err(Error::from)?;
        for _ in 0..CHECKPOINT_ATTEMPTS {
            if conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get::<_, i64>(0)).map_err(Error::from)? == 0 {
                return Ok(());
            }
        }
        Err(ResetError::Busy("readers kept SQLite's WAL from a full checkpoint"))
    }
}
