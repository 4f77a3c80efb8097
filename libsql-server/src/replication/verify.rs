//! Reading and verifying the replication log and snapshots, and replaying them into a database
//! image to compare with the live data file. Tests use it; the integrity check will.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use libsql_sys::rusqlite::OpenFlags;
use libsql_sys::wal::Sqlite3WalManager;

use super::format::{checksum, FrameHeader, LogHeader, SnapshotHeader, FRAME_SIZE, PAGE_SIZE, SNAPSHOT_HEADER_SIZE};
use super::logger::{frame_offset, read_log_header};
use super::{LogError, SNAPSHOTS_DIR, WALLOG};

/// Walks every committed frame of a wallog, checking frame_no continuity and the checksum
/// chain, and hands each frame to `visit`. Returns the header.
pub fn walk_wallog(path: &Path, mut visit: impl FnMut(&FrameHeader, &[u8])) -> Result<LogHeader, LogError> {
    let file = File::open(path).map_err(|e| LogError::io(path, e))?;
    let header = read_log_header(&file, path)?;
    let mut frame = vec![0u8; FRAME_SIZE];
    let mut previous = header.start_checksum;
    for index in 0..header.frame_count {
        let expected_no = header.start_frame_no + index;
        file.read_exact_at(&mut frame, frame_offset(index))
            .map_err(|_| LogError::corrupt(path, Some(expected_no), "the file ends before the frames its header counts"))?;
        let fh = FrameHeader::decode(&frame[..24]);
        if fh.frame_no != expected_no {
            return Err(LogError::corrupt(path, Some(expected_no), format!("frame_no {} where {expected_no} was expected", fh.frame_no)));
        }
        let page = &frame[24..];
        let sum = checksum(previous, page);
        // The libSQL server seeds the first frame after a compaction with 0 rather than with
        // the header's start checksum: accept either there, so its directories verify clean.
        let upstream_seed = index == 0 && header.start_frame_no > 0 && fh.checksum == checksum(0, page);
        if fh.checksum != sum && !upstream_seed {
            return Err(LogError::corrupt(path, Some(expected_no), "checksum mismatch"));
        }
        previous = fh.checksum;
        if fh.page_no == 0 {
            return Err(LogError::corrupt(path, Some(expected_no), "page number 0"));
        }
        if index + 1 == header.frame_count && fh.size_after == 0 {
            return Err(LogError::corrupt(path, Some(expected_no), "the last committed frame carries no commit size"));
        }
        visit(&fh, page);
    }
    Ok(header)
}

/// Walks a snapshot file's frames (newest first), checking its header and frame numbers.
pub fn walk_snapshot(path: &Path, mut visit: impl FnMut(&FrameHeader, &[u8])) -> Result<SnapshotHeader, LogError> {
    let file = File::open(path).map_err(|e| LogError::io(path, e))?;
    let mut bytes = [0u8; SNAPSHOT_HEADER_SIZE];
    file.read_exact_at(&mut bytes, 0).map_err(|_| LogError::corrupt(path, None, "shorter than its header"))?;
    let header = SnapshotHeader::decode(&bytes).map_err(|e| LogError::corrupt(path, None, e.to_string()))?;
    let mut frame = vec![0u8; FRAME_SIZE];
    let mut last_no = None;
    for index in 0..header.frame_count {
        let at = (SNAPSHOT_HEADER_SIZE + index as usize * FRAME_SIZE) as u64;
        file.read_exact_at(&mut frame, at).map_err(|_| LogError::corrupt(path, None, "the file ends before the frames its header counts"))?;
        let fh = FrameHeader::decode(&frame[..24]);
        let in_range = (header.start_frame_no..=header.end_frame_no).contains(&fh.frame_no);
        let descending = last_no.is_none_or(|last| fh.frame_no < last);
        if !in_range || !descending || fh.page_no == 0 {
            return Err(LogError::corrupt(path, Some(fh.frame_no), "frame out of order or out of the snapshot's range"));
        }
        last_no = Some(fh.frame_no);
        visit(&fh, &frame[24..]);
    }
    Ok(header)
}

/// The snapshots of `log_id` in `dir`, in frame order.
pub fn snapshots_of(dir: &Path, log_id: uuid::Uuid) -> Vec<(u64, u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir.join(SNAPSHOTS_DIR)) else { return Vec::new() };
    let mut found: Vec<_> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let (id, start, end) = SnapshotHeader::parse_file_name(&e.file_name().to_string_lossy())?;
            (id == log_id).then(|| (start, end, e.path()))
        })
        .collect();
    found.sort();
    found
}

/// The database image the log describes: snapshots oldest first, then the wallog's frames.
/// Fails with the first corruption found, or on a hole in the frame sequence.
pub fn replay(dir: &Path) -> Result<Vec<u8>, LogError> {
    let mut image = Vec::new();
    let size = walk_pages(dir, |page_no, page| {
        let at = (page_no as usize - 1) * PAGE_SIZE;
        if image.len() < at + PAGE_SIZE {
            image.resize(at + PAGE_SIZE, 0);
        }
        image[at..at + PAGE_SIZE].copy_from_slice(page);
        Ok(())
    })?;
    image.truncate(size as usize * PAGE_SIZE);
    Ok(image)
}

/// [`replay`] into the file `out` (at `path`, for errors), a page at a time; the database's
/// size in pages. The file is not synced.
pub fn replay_into(dir: &Path, out: &File, path: &Path) -> Result<u64, LogError> {
    let size = walk_pages(dir, |page_no, page| out.write_all_at(page, (page_no as u64 - 1) * PAGE_SIZE as u64).map_err(|e| LogError::io(path, e)))?;
    out.set_len(u64::from(size) * PAGE_SIZE as u64).map_err(|e| LogError::io(path, e))?;
    Ok(u64::from(size))
}

/// Every page the log holds, in the order that leaves each at its newest version (snapshots
/// oldest first, then the wallog's committed frames); the database's final size in pages.
fn walk_pages(dir: &Path, mut put: impl FnMut(u32, &[u8]) -> Result<(), LogError>) -> Result<u32, LogError> {
    let wallog = dir.join(WALLOG);
    let header = read_log_header(&File::open(&wallog).map_err(|e| LogError::io(&wallog, e))?, &wallog)?;
    let mut size = 0u32;
    let mut failed = None;
    let mut next = 0u64;
    for (start, end, path) in snapshots_of(dir, header.log_id) {
        if start != next {
            return Err(LogError::corrupt(&path, Some(next), format!("hole: frames {next}..{start} are in no snapshot")));
        }
        let snap = walk_snapshot(&path, |fh, page| {
            if failed.is_none() {
                failed = put(fh.page_no, page).err();
            }
        })?;
        size = snap.size_after;
        next = end + 1;
    }
    if next != header.start_frame_no {
        return Err(LogError::corrupt(&wallog, Some(next), format!("hole: frames {next}..{} are in no snapshot", header.start_frame_no)));
    }
    walk_wallog(&wallog, |fh, page| {
        if failed.is_none() {
            failed = put(fh.page_no, page).err();
        }
        if fh.size_after != 0 {
            size = fh.size_after;
        }
    })?;
    failed.map_or(Ok(size), Err)
}

/// Checks the replication log of namespace directory `dir` without rebuilding the database:
/// the wallog (header, frame numbers, checksum chain, a commit at its end), every snapshot
/// and retired log of its log_id (their frames in order and in range), and that those cover
/// every frame from 0 to the wallog's first without a hole. The first problem found, naming
/// its file and frame.
///
/// A compaction may replace files while this reads them: a file that vanished underway sends
/// the check back to the start (a few times) instead of reporting it missing.
pub fn check_log(dir: &Path) -> Result<(), LogError> {
    let mut attempts = 0;
    loop {
        match check_log_once(dir) {
            Err(LogError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound && attempts < 3 => attempts += 1,
            other => return other,
        }
    }
}

fn check_log_once(dir: &Path) -> Result<(), LogError> {
    let wallog = dir.join(WALLOG);
    let header = walk_wallog(&wallog, |_, _| {})?;
    // Snapshots and retired logs (not yet snapshotted), by the frames they cover.
    let mut covering: Vec<(u64, u64, PathBuf, bool)> =
        snapshots_of(dir, header.log_id).into_iter().map(|(start, end, path)| (start, end, path, true)).collect();
    if let Ok(entries) = std::fs::read_dir(dir.join(super::TO_COMPACT_DIR)) {
        for entry in entries.filter_map(|e| e.ok()) {
            if let Some((id, start, end)) = SnapshotHeader::parse_file_name(&entry.file_name().to_string_lossy()) {
                if id == header.log_id {
                    covering.push((start, end, entry.path(), false));
                }
            }
        }
    }
    covering.sort_by_key(|(start, end, _, _)| (*start, std::cmp::Reverse(*end)));
    let mut next = 0u64;
    for (start, end, path, is_snapshot) in covering {
        if end < next {
            continue; // covered by a merged snapshot beside it (a removal a crash interrupted)
        }
        if start > next {
            return Err(LogError::corrupt(&path, Some(next), format!("hole: frames {next}..{start} are in no snapshot")));
        }
        if is_snapshot {
            let snap = walk_snapshot(&path, |_, _| {})?;
            if (snap.start_frame_no, snap.end_frame_no) != (start, end) {
                return Err(LogError::corrupt(&path, None, "its header's frame range differs from its name's"));
            }
        } else {
            walk_wallog(&path, |_, _| {})?;
        }
        next = end + 1;
    }
    if next < header.start_frame_no {
        return Err(LogError::corrupt(&wallog, Some(next), format!("hole: frames {next}..{} are in no snapshot", header.start_frame_no)));
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
pub enum Comparison {
    Equal { pages: u64 },
    /// The first page (1-based) that differs, and both sizes in pages.
    Differs { first_page: u64, log_pages: u64, data_pages: u64 },
}

/// Replays the log of `dir` and compares it page by page with `data` (checkpointed first, so
/// SQLite's WAL is in it). The namespace must not be written meanwhile.
pub fn compare_with_data(dir: &Path, data: &Path) -> Result<Comparison, LogError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    {
        let conn = libsql_sys::Connection::open(data, flags, Sqlite3WalManager::new(), 0, None)
            .map_err(|e| LogError::Sqlite(data.to_owned(), e))?;
        let busy: i64 = conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(|e| LogError::Sqlite(data.to_owned(), e))?;
        if busy != 0 {
            return Err(LogError::CheckpointBusy(data.to_owned()));
        }
    }
    let live = std::fs::read(data).map_err(|e| LogError::io(data, e))?;
    let replayed = replay(dir)?;
    let pages = |b: &[u8]| (b.len() / PAGE_SIZE) as u64;
    let first_diff = live.chunks(PAGE_SIZE).zip(replayed.chunks(PAGE_SIZE)).position(|(a, b)| a != b);
    Ok(match first_diff {
        None if live.len() == replayed.len() => Comparison::Equal { pages: pages(&live) },
        None => Comparison::Differs { first_page: pages(&live).min(pages(&replayed)) + 1, log_pages: pages(&replayed), data_pages: pages(&live) },
        Some(i) => Comparison::Differs { first_page: i as u64 + 1, log_pages: pages(&replayed), data_pages: pages(&live) },
    })
}
