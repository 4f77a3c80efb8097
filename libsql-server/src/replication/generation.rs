//! Generations: what sync clients follow. A generation is one wallog file, which always opens
//! with a transaction carrying every page of the database (a full image): after a log
//! rebuild, and after every compaction. So a client that stood anywhere in generation G and
//! moves to G+1 at its frame 1 ends up with exactly the server's database.
//!
//! The number is stored in `dbs/<ns>/generation` beside the log it names, written durably,
//! and only ever increases, across restarts and moves of the data directory.

use std::path::Path;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::LogError;
use crate::durable;

pub const GENERATION_FILE: &str = "generation";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationRecord {
    pub generation: u64,
    /// The wallog this generation is: its log_id and first frame_no.
    pub log_id: Uuid,
    pub start_frame_no: u64,
}

impl GenerationRecord {
    pub fn names(&self, log_id: Uuid, start_frame_no: u64) -> bool {
        self.log_id == log_id && self.start_frame_no == start_frame_no
    }
}

/// The stored record, if any. An unreadable record is treated as missing, but its number is
/// kept if it can be read at all, so generations never go backwards.
pub fn read(dir: &Path) -> Option<GenerationRecord> {
    let bytes = std::fs::read(dir.join(GENERATION_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn write(dir: &Path, record: &GenerationRecord) -> Result<(), LogError> {
    let path = dir.join(GENERATION_FILE);
    let bytes = serde_json::to_vec(record).expect("a record serialises");
    durable::write_file(&path, &bytes).map_err(|e| LogError::io(&path, e))
}

/// The record for the log (log_id, start_frame_no): the stored one if it names that log,
/// otherwise the next generation, stored.
pub fn for_log(dir: &Path, log_id: Uuid, start_frame_no: u64) -> Result<GenerationRecord, LogError> {
    let stored = read(dir);
    if let Some(record) = stored.filter(|r| r.names(log_id, start_frame_no)) {
        return Ok(record);
    }
    let record = GenerationRecord { generation: stored.map_or(1, |r| r.generation + 1), log_id, start_frame_no };
    write(dir, &record)?;
    Ok(record)
}
