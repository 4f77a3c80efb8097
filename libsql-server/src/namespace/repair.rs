//! Online, per-namespace repair. `integrity_check` classifies a namespace from its files
//! alone (so it also judges one that cannot open) and names the repair that fixes what it
//! found, so an operator (or a script) never parses messages:
//!
//! | data file | replication log | repair              |
//! |-----------|-----------------|---------------------|
//! | passes    | verifies        | `none`              |
//! | passes    | broken          | `reset-replication` |
//! | fails     | verifies        | `rebuild-data`      |
//! | fails     | broken          | `restore-from-backup` |

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::database::{check_data_file, replay_checked, RebuildError, Rebuilt};
use crate::durable;
use crate::replication::{failpoint, verify, LogError, DATA, DATA_WAL};

/// The repair that fixes what a check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Repair {
    None,
    ResetReplication,
    RebuildData,
    RestoreFromBackup,
}

impl Repair {
    pub fn name(self) -> &'static str {
        match self {
            Repair::None => "none",
            Repair::ResetReplication => "reset-replication",
            Repair::RebuildData => "rebuild-data",
            Repair::RestoreFromBackup => "restore-from-backup",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LogVerdict {
    pub ok: bool,
    pub message: String,
    /// The file the first problem is in (`wallog`, `snapshots/<name>`, `to_compact/<name>`).
    pub file: Option<String>,
    pub frame_no: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub ok: bool,
    pub check: &'static str,
    pub message: String,
    pub replication_log: LogVerdict,
    pub repair: Repair,
    pub elapsed_ms: u64,
}

/// Checks the namespace in `dir`: its data file with SQLite's `quick_check` (`integrity_check`
/// with `full`) and its replication log with [`verify::check_log`]. Blocking.
pub fn integrity_check(dir: &Path, full: bool) -> Verdict {
    let started = Instant::now();
    let data = check_data_file(&dir.join(DATA), full);
    let replication_log = match verify::check_log(dir) {
        Ok(()) => LogVerdict { ok: true, message: "ok".into(), file: None, frame_no: None },
        Err(e) => log_verdict(dir, e),
    };
    let repair = match (data.ok, replication_log.ok) {
        (true, true) => Repair::None,
        (true, false) => Repair::ResetReplication,
        (false, true) => Repair::RebuildData,
        (false, false) => Repair::RestoreFromBackup,
    };
    Verdict {
        ok: data.ok,
        check: if full { "full" } else { "quick" },
        message: data.message,
        replication_log,
        repair,
        elapsed_ms: started.elapsed().as_millis() as u64,
    }
}

/// Checks a replica's copy in `dir`: its data file only, since it follows the primary's log
/// and has none of its own (`applied` is where it stands in the primary's log). A copy that
/// fails is not repaired here: its primary holds the data. Blocking.
pub fn integrity_check_copy(dir: &Path, full: bool, applied: Option<u64>) -> Verdict {
    let started = Instant::now();
    let data = check_data_file(&dir.join(DATA), full);
    let message = "a replica's copy: it follows the primary's log and keeps none of its own".to_owned();
    Verdict {
        ok: data.ok,
        check: if full { "full" } else { "quick" },
        repair: if data.ok { Repair::None } else { Repair::RestoreFromBackup },
        message: data.message,
        replication_log: LogVerdict { ok: true, message, file: None, frame_no: applied },
        elapsed_ms: started.elapsed().as_millis() as u64,
    }
}

fn log_verdict(dir: &Path, e: LogError) -> LogVerdict {
    let relative = |path: &Path| path.strip_prefix(dir).unwrap_or(path).to_string_lossy().into_owned();
    let (file, frame_no, message) = match &e {
        LogError::Corrupt { path, frame_no, what } => (Some(relative(path)), *frame_no, what.clone()),
        LogError::Io { path, source } => (Some(relative(path)), None, source.to_string()),
        other => (None, None, other.to_string()),
    };
    LogVerdict { ok: false, message, file, frame_no }
}

/// Rebuilds the data file of the namespace in `dir`, which is not loaded (it cannot open):
/// the log's replay, checked, replaces the data file by rename, and SQLite's WAL and shared
/// memory beside it go (the log holds every transaction they held). A crash before the rename
/// leaves the old file, after it the new one. Blocking.
pub fn rebuild_unloaded(dir: &Path) -> Result<Rebuilt, RebuildError> {
    let started = Instant::now();
    let failed = |e: std::io::Error| RebuildError::Failed(e.to_string());
    let (scratch, pages) = replay_checked(dir)?;
    let rebuilt = scratch.path().join(DATA);
    durable::sync_file(&rebuilt).map_err(failed)?;
    failpoint::check("rebuild.before_rename", dir).map_err(failed)?;
    std::fs::rename(&rebuilt, dir.join(DATA)).map_err(failed)?;
    durable::sync_dir(dir).map_err(failed)?;
    failpoint::check("rebuild.after_rename", dir).map_err(failed)?;
    for stale in [DATA_WAL.to_owned(), format!("{DATA}-shm")] {
        match std::fs::remove_file(dir.join(stale)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(failed(e)),
            _ => {}
        }
    }
    durable::sync_dir(dir).map_err(failed)?;
    Ok(Rebuilt { pages, elapsed: started.elapsed() })
}
