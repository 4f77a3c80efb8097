//! The log's file on disk: its layout (header, then frames), creation, zero fill ahead of
//! the frames, and the marks and leftovers beside it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::durable;
use crate::replication::format::{LogHeader, FRAME_SIZE, LOG_HEADER_SIZE};
use crate::replication::{LogError, DATA, DATA_WAL, DROPPED_PREFIX, LOG_UNTRUSTED, WALLOG_REBUILD};

/// How far ahead of the frames the file is filled with zeros.
const PREALLOCATE: u64 = 4 << 20;

/// Marks the log of `dir` as holding frames that must not be rolled forward; recovery then
/// trusts the data file, and the rebuild removes the mark.
pub(super) fn mark_untrusted(dir: &Path) -> std::io::Result<()> {
    // Trusted from now on, the data file must hold every acknowledged transaction durably:
    // SQLite does not sync it, so it is synced here (with its WAL) before the mark says so.
    durable::sync_file(&dir.join(DATA))?;
    durable::sync_file(&dir.join(DATA_WAL))?;
    File::create(dir.join(LOG_UNTRUSTED))?.sync_all()?;
    durable::sync_dir(dir)
}

/// Fills the file with zeros up to past `needed`, a chunk at a time.
pub(super) fn preallocate(file: &File, allocated: &mut u64, needed: u64) -> std::io::Result<()> {
    if needed <= *allocated {
        return Ok(());
    }
    let target = needed.div_ceil(PREALLOCATE) * PREALLOCATE;
    let zeros = vec![0u8; 1 << 20];
    let mut at = *allocated;
    while at < target {
        let n = (target - at).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    *allocated = target;
    Ok(())
}

pub(in crate::replication) fn frame_offset(index: u64) -> u64 {
    LOG_HEADER_SIZE as u64 + index * FRAME_SIZE as u64
}

/// Reads and checks the header of the log file `file` (at `path`, for errors).
pub(in crate::replication) fn read_log_header(file: &File, path: &Path) -> Result<LogHeader, LogError> {
    let mut bytes = [0u8; LOG_HEADER_SIZE];
    file.read_exact_at(&mut bytes, 0).map_err(|_| LogError::corrupt(path, None, "shorter than its header"))?;
    LogHeader::decode(&bytes).map_err(|e| LogError::corrupt(path, None, e.to_string()))
}

/// Creates a log file holding only `header`, durably.
pub(in crate::replication) fn create_log_file(path: &Path, header: &LogHeader) -> Result<File, LogError> {
    let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(|e| LogError::io(path, e))?;
    file.write_all_at(&header.encode(), 0).and_then(|()| file.sync_all()).map_err(|e| LogError::io(path, e))?;
    durable::sync_parent(path).map_err(|e| LogError::io(path, e))?;
    Ok(file)
}

/// What an interrupted reset or data rebuild left beside the log: a half-built log
/// (`wallog.rebuild`), scratch replays (`.rebuild-*`) and a replaced log's snapshots moved
/// aside (`.dropped-*`). Nothing reads them.
pub(super) fn remove_leftovers(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(WALLOG_REBUILD));
    remove_trees(dir, &[".rebuild-", DROPPED_PREFIX]);
}

/// Removes the directory trees in `dir` whose names begin with one of `prefixes`, in one scan.
pub(super) fn remove_trees(dir: &Path, prefixes: &[&str]) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.filter_map(|e| e.ok()) {
        if !prefixes.iter().any(|p| entry.file_name().to_string_lossy().starts_with(p)) {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::warn!(path = %entry.path().display(), error = %e, "removing a leftover beside the log failed; the next open tries again");
        }
    }
}

pub(super) fn count_files(dir: &Path, extension: &str) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(|e| e.ok()).filter(|e| e.path().extension().is_some_and(|x| x == extension)).count())
        .unwrap_or(0)
}
