//! Turning a retired log (in `to_compact/`) into a snapshot file (in `snapshots/`): every page
//! once, at its newest version, newest frame first.
//!
//! A log that opens with a full image (as every log this server starts does), or that starts
//! at the log_id's frame 0, holds the whole database: its snapshot is the merge of every
//! snapshot before it (the libSQL server merges snapshots into one that starts at 0 too). So
//! it is named from the first frame those cover, and once it is durable the snapshots it
//! covers are removed: the directory keeps one snapshot, never more than the database's size.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{FrameHeader, SnapshotHeader, FRAME_SIZE};
use super::verify::snapshots_of;
use super::logger::{frame_offset, read_log_header};
use super::{failpoint, LogError, SNAPSHOTS_DIR, TO_COMPACT_DIR};
use crate::durable;

/// Retired logs waiting for their snapshot, oldest first.
pub fn pending(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir.join(TO_COMPACT_DIR)) else { return Vec::new() };
    let mut retired: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let (_, start, _) = SnapshotHeader::parse_file_name(&e.file_name().to_string_lossy())?;
            Some((start, e.path()))
        })
        .collect();
    retired.sort();
    retired.into_iter().map(|(_, p)| p).collect()
}

/// Writes the snapshot of a retired log, then removes the retired log; returns the frames the
/// snapshot holds. A crash leaves the retired log (rewritten next open) and at worst a
/// `.partial` snapshot (removed next open).
pub fn write_snapshot(dir: &Path, retired: &Path) -> Result<u64, LogError> {
    let io = |p: &Path, e| LogError::io(p, e);
    let file = File::open(retired).map_err(|e| io(retired, e))?;
    let header = read_log_header(&file, retired)?;
    if header.frame_count == 0 {
        std::fs::remove_file(retired).map_err(|e| io(retired, e))?;
        return Ok(0);
    }

    // Pass 1: the newest frame of every page, the size after the last commit, and whether
    // the first transaction is a full image (every page from 1 to its size, once).
    let mut newest: HashMap<u32, u64> = HashMap::new();
    let mut frame = vec![0u8; FRAME_SIZE];
    let mut size_after = 0;
    let mut first_transaction = Some(HashSet::new());
    let mut opens_with_image = false;
    for index in 0..header.frame_count {
        file.read_exact_at(&mut frame[..24], frame_offset(index)).map_err(|e| io(retired, e))?;
        let fh = FrameHeader::decode(&frame[..24]);
        newest.insert(fh.page_no, index);
        if let Some(pages) = first_transaction.as_mut() {
            pages.insert(fh.page_no);
            if fh.size_after != 0 {
                opens_with_image = pages.len() == fh.size_after as usize && pages.iter().all(|p| *p <= fh.size_after);
                first_transaction = None;
            }
        }
        if fh.size_after != 0 {
            size_after = fh.size_after;
        }
    }
    let whole_database = opens_with_image || header.start_frame_no == 0;
    let start_frame_no = if whole_database {
        snapshots_of(dir, header.log_id).first().map_or(header.start_frame_no, |(start, _, _)| (*start).min(header.start_frame_no))
    } else {
        header.start_frame_no
    };
    // Pages past the final size are not part of the database the snapshot ends with.
    let mut indexes: Vec<u64> = newest.into_iter().filter(|(page, _)| *page <= size_after).map(|(_, index)| index).collect();
    indexes.sort_unstable_by(|a, b| b.cmp(a));

    let snapshot = SnapshotHeader {
        log_id: header.log_id,
        start_frame_no,
        end_frame_no: header.next_frame_no() - 1,
        frame_count: indexes.len() as u64,
        size_after,
    };
    let snapshots = dir.join(SNAPSHOTS_DIR);
    std::fs::create_dir_all(&snapshots).map_err(|e| io(&snapshots, e))?;
    let path = snapshots.join(snapshot.file_name());
    let partial = path.with_extension("partial");

    // Pass 2: those frames, newest first, with size_after cleared as the format wants.
    let out = OpenOptions::new().write(true).create(true).truncate(true).open(&partial).map_err(|e| io(&partial, e))?;
    let mut out = BufWriter::with_capacity(64 * FRAME_SIZE, out);
    out.write_all(&snapshot.encode()).map_err(|e| io(&partial, e))?;
    for index in indexes {
        file.read_exact_at(&mut frame, frame_offset(index)).map_err(|e| io(retired, e))?;
        frame[20..24].fill(0);
        out.write_all(&frame).map_err(|e| io(&partial, e))?;
    }
    let out = out.into_inner().map_err(|e| io(&partial, e.into_error()))?;
    out.sync_all().map_err(|e| io(&partial, e))?;
    failpoint::check("compaction.before_snapshot_rename", &partial).map_err(|e| LogError::io(&partial, e))?;
    std::fs::rename(&partial, &path).map_err(|e| io(&partial, e))?;
    durable::sync_dir(&snapshots).map_err(|e| io(&snapshots, e))?;
    prune(dir, false)?;
    failpoint::check("compaction.before_retired_removed", retired).map_err(|e| LogError::io(retired, e))?;
    std::fs::remove_file(retired).map_err(|e| io(retired, e))?;
    durable::sync_parent(retired).map_err(|e| io(retired, e))?;
    tracing::info!(snapshot = %path.display(), frames = snapshot.frame_count, "snapshot written");
    Ok(snapshot.frame_count)
}

/// Removes the snapshots another snapshot of the same log_id covers (a merged one made them
/// redundant) and, with `partials` (at open, when no snapshot is being written), unfinished
/// `.partial` snapshots. Each removal leaves a readable set: the covering snapshot is durable
/// before any it covers goes, so a crash between two removals leaves overlapping snapshots,
/// which the next open prunes here again.
pub fn prune(dir: &Path, partials: bool) -> Result<(), LogError> {
    let snapshots = dir.join(SNAPSHOTS_DIR);
    let Ok(entries) = std::fs::read_dir(&snapshots) else { return Ok(()) };
    let mut found = Vec::new();
    let mut redundant = Vec::new();
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        match SnapshotHeader::parse_file_name(&name) {
            Some(range) => found.push((range, entry.path())),
            None if partials && name.ends_with(".partial") => redundant.push(entry.path()),
            None => {}
        }
    }
    for ((id, start, end), path) in &found {
        let covered = found.iter().any(|((other_id, other_start, other_end), _)| {
            other_id == id && other_start <= start && end <= other_end && (other_start, other_end) != (start, end)
        });
        if covered {
            redundant.push(path.clone());
        }
    }
    for path in &redundant {
        failpoint::check("compaction.prune", path).map_err(|e| LogError::io(path, e))?;
        match std::fs::remove_file(path) {
            Ok(()) => tracing::info!(snapshot = %path.display(), "redundant snapshot removed"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::io(path, e)),
        }
    }
    if !redundant.is_empty() {
        durable::sync_dir(&snapshots).map_err(|e| LogError::io(&snapshots, e))?;
    }
    Ok(())
}
