//! `reset-replication`: a new replication log built from the live data file, online. Writers
//! wait only while the data file is made whole and pinned, and for the swap; the image is
//! written, and the data checked, while they go on. Nothing changes if the data fails the
//! check.

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::check::{check_data_file, Checker, DataCheck};
use super::{Database, Error};
use crate::replication::LogError;

/// How long each step of a reset waits for the write gate (writers queue behind it meanwhile).
const RESET_GATE_WAIT: Duration = Duration::from_secs(30);
/// How many tries a full checkpoint gets before a reset gives up (readers hold the WAL).
const CHECKPOINT_ATTEMPTS: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    #[error("the namespace is busy: {0}; try again")]
    Busy(&'static str),
    #[error("the namespace cannot be opened, so its log cannot be rebuilt from it (run integrity-check): {0}")]
    Unopenable(String),
    #[error("the live data fails SQLite's check, so the log was left as it was: {0}")]
    DataCorrupt(String),
    #[error("the live data could not be checked, so the log was left as it was: {0}; try again")]
    Unchecked(String),
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
    /// How long writers waited: while the data file was made whole and pinned, and for the swap.
    pub writers_held: (Duration, Duration),
}

/// Why a reset refuses, given the data check: corrupt data, or a check that could not run (which
/// says nothing of the data); `None` if the data passed.
fn refusal(check: DataCheck) -> Option<ResetError> {
    match check {
        DataCheck { ok: true, .. } => None,
        DataCheck { judged: true, message, .. } => Some(ResetError::DataCorrupt(message)),
        DataCheck { judged: false, message, .. } => Some(ResetError::Unchecked(message)),
    }
}

impl Database {
    /// Rebuilds the namespace's replication log from its data file (see
    /// `ReplicationLogger::prepare_reset` and `finish_reset`):
    /// 1. with the write gate: SQLite's WAL is checkpointed into the data file, and a read
    ///    transaction pins it (no checkpoint writes into it while that reader is open);
    /// 2. without it: the pinned file is imaged into a new log beside the live one, and
    ///    `quick_check` runs on the pinned snapshot beside the image;
    /// 3. with it again, if the check passed: the transactions committed meanwhile are copied
    ///    into the new log, which is swapped in.
    pub fn reset_replication(&self) -> Result<Reset, ResetError> {
        self.reset_replication_with(|| {})
    }

    /// [`Self::reset_replication`], running `meanwhile` once the new log's image is written and
    /// before the write gate is taken again (tests write there: writers are not held).
    pub fn reset_replication_with(&self, meanwhile: impl FnOnce()) -> Result<Reset, ResetError> {
        let started = Instant::now();
        let shared = &self.shared;
        let logger = shared.log()?;
        let pin_taken = {
            let _permit = shared.gate.acquire(RESET_GATE_WAIT).ok_or(ResetError::Busy("the write lock stayed busy"))?;
            // An empty WAL is not checkpointed: that would restart it, which makes every pooled
            // connection drop its page cache.
            let emptied = if shared.wal_is_empty() { Ok(true) } else { shared.checkpoint_fully(CHECKPOINT_ATTEMPTS) };
            let checkpointed = match emptied {
                Ok(true) => Ok(()),
                Ok(false) => Err(ResetError::Busy("readers kept SQLite's WAL from a full checkpoint")),
                Err(e) => Err(e.into()),
            };
            checkpointed
                .and_then(|()| Checker::open(&shared.path).and_then(Checker::pin).map_err(|e| ResetError::Database(e.into())))
                .map(|pin| (pin, logger.position()))
        };
        // A data file SQLite cannot even checkpoint or read is judged by the check, which runs
        // without the write gate.
        let (pin, at) = match pin_taken {
            Ok(taken) => taken,
            Err(e) => return Err(refusal(check_data_file(&shared.path, false)).unwrap_or(e)),
        };
        let pinned = started.elapsed();
        let old_log_id = logger.log_id();
        // No lock is held here, so the image and the check run at background priority, on
        // threads named for them: the other namespaces' requests (and this one's) come first.
        let background = |name: &str| std::thread::Builder::new().name(name.into());
        let no_thread = |_: std::io::Error| ResetError::Busy("no thread could be started for the reset");
        let (prepared, check) = std::thread::scope(|scope| {
            let checker = background("sqld-reset-chk")
                .spawn_scoped(scope, move || {
                    crate::blocking::lower_priority();
                    let check = pin.check(false);
                    (pin, check)
                })
                .map_err(no_thread)?;
            let imager = background("sqld-reset-img")
                .spawn_scoped(scope, || {
                    crate::blocking::lower_priority();
                    logger.prepare_reset(&shared.path, at)
                })
                .map_err(no_thread)?;
            let prepared = imager.join().unwrap_or_else(|_| panic!("writing the new log's image panicked"));
            let (pin, check) = checker.join().unwrap_or_else(|_| panic!("the data check panicked"));
            // The image is written: the data file may move on.
            drop(pin);
            Ok::<_, ResetError>((prepared, check))
        })?;
        if let Some(refused) = refusal(check) {
            return Err(refused);
        }
        let prepared = prepared?;
        meanwhile();
        let swapped = {
            let _permit = shared.gate.acquire(RESET_GATE_WAIT).ok_or(ResetError::Busy("the write lock stayed busy"))?;
            let swapping = Instant::now();
            logger.finish_reset(prepared).map(|done| (done, swapping.elapsed()))
        };
        // The old log's snapshots and retired logs were moved aside in the swap (also if it
        // failed after that); their blocks are freed here, while writers go on.
        logger.remove_dropped();
        let ((log_id, generation, pages), swapped) = swapped?;
        Ok(Reset { old_log_id, log_id, generation, pages, elapsed: started.elapsed(), writers_held: (pinned, swapped) })
    }
}
