//! How far the data file is known durable: `dbs/<ns>/synced` names a log and a frame_no, and
//! says that the data file, fsynced, holds every transaction of that log up to that frame.
//! SQLite itself does not sync the data file (the log is the durable copy), so after a crash
//! the roll-forward would otherwise have to compare every page of the database with the log;
//! with the record it only replays the log after that frame. Written after each complete
//! checkpoint, each new log image and each rebuild; a record naming another log is ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::durable;

pub const SYNCED_FILE: &str = "synced";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncedThrough {
    pub log_id: Uuid,
    pub start_frame_no: u64,
    /// The last frame (a commit frame) whose transaction the synced data file holds.
    pub frame_no: u64,
}

/// The stored record, if it can be read.
pub fn read(dir: &Path) -> Option<SyncedThrough> {
    serde_json::from_slice(&std::fs::read(dir.join(SYNCED_FILE)).ok()?).ok()
}

/// Fsyncs the data file `data`, then records that it holds everything through `position`.
/// The caller guarantees that it does (the position was taken before a complete checkpoint),
/// and that nothing else records for this namespace at the same time (both would write
/// through one temporary file): the namespace's logger serialises them, see
/// `ReplicationLogger::record_data_synced`. The record only saves recovery work, so a failure
/// is logged and reported as `false`, not returned.
pub fn record(dir: &Path, data: &Path, position: SyncedThrough) -> bool {
    store(dir, position, durable::sync_file(data))
}

/// [`record`] for a data file the caller fsynced after it held everything through `position`
/// (a log's image is taken from a data file synced first).
pub fn record_presynced(dir: &Path, position: SyncedThrough) -> bool {
    store(dir, position, Ok(()))
}

fn store(dir: &Path, position: SyncedThrough, data_synced: std::io::Result<()>) -> bool {
    let path = dir.join(SYNCED_FILE);
    let bytes = serde_json::to_vec(&position).expect("a record serialises");
    let written = data_synced.and_then(|()| durable::write_file(&path, &bytes));
    if let Err(e) = &written {
        tracing::warn!(path = %path.display(), error = %e, "could not record how far the data file is durable; a recovery would walk more of the log");
    }
    written.is_ok()
}
