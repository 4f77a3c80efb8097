//! Opening a namespace's replication log, and rebuilding it from the data file when it cannot
//! be trusted (dirty recovery).
//!
//! `.sentinel` exists while a namespace is open. Found at open, it means the last run did not
//! shut down cleanly. The log holds the whole database and every committed transaction
//! durably (it is fsynced before SQLite commits, and SQLite itself does not sync), but a power
//! cut may have left the data file behind or torn: so the data file is first rewritten to the
//! log's last state, then the log is rebuilt from the data file (a new log_id, as the libSQL
//! server does). The log is rebuilt the same way, without a roll-forward, when it is missing
//! beside existing data, older than version 2, or its header is unreadable.
//!
//! Every step of a rebuild is idempotent and the sentinel stays until the namespace closes
//! cleanly, so a crash anywhere inside a rebuild just means the next open rebuilds again.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libsql_sys::rusqlite::OpenFlags;
use libsql_sys::wal::Sqlite3WalManager;
use uuid::Uuid;

use super::format::{checksum, FrameHeader, LogHeader, FRAME_HEADER_SIZE, FRAME_SIZE, LOG_HEADER_SIZE, PAGE_SIZE};
use super::generation;
use super::synced::{self, SyncedThrough};
use super::image::{write_image, ImageTarget};
use super::logger::{create_log_file, frame_offset, read_log_header, LogSettings, ReplicationLogger};
use super::{
    failpoint, LogError, DATA, DATA_WAL, DROPPED_PREFIX, LOG_UNTRUSTED, SENTINEL, SNAPSHOTS_DIR, TO_COMPACT_DIR, WALLOG, WALLOG_NEW,
};
use crate::durable;

/// Why the log was rebuilt, and what it cost.
#[derive(Debug, Clone)]
pub struct Rebuild {
    pub reason: &'static str,
    pub pages: u64,
    pub took: Duration,
}

/// Operator switches, read from the environment as the libSQL server reads them.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecoveryOptions {
    /// `LIBSQL_IGNORE_DIRTY_LOG`: trust the log even if the sentinel says the last run crashed.
    pub ignore_dirty: bool,
    /// `LIBSQL_PRESERVE_SENTINEL_ON_SHUTDOWN=1`: keep the sentinel on a clean close, so the
    /// next open rebuilds the log (the operator's way to force a rebuild with a restart).
    pub preserve_sentinel: bool,
}

impl RecoveryOptions {
    pub fn from_env() -> Self {
        let set = |name| std::env::var_os(name).is_some_and(|v| !v.is_empty() && v != "0" && v != "false");
        RecoveryOptions { ignore_dirty: set("LIBSQL_IGNORE_DIRTY_LOG"), preserve_sentinel: set("LIBSQL_PRESERVE_SENTINEL_ON_SHUTDOWN") }
    }
}

/// Opens the log of namespace directory `dir` whose database file is `data`, rebuilding it
/// first if it cannot be trusted, then marks the namespace open (the sentinel).
pub fn open(dir: &Path, data: &Path, settings: LogSettings, options: RecoveryOptions) -> Result<(Arc<ReplicationLogger>, Option<Rebuild>), LogError> {
    finish_interrupted_retire(dir)?;
    if dir.join(SENTINEL).exists() {
        // Even when the log is then trusted as it is (LIBSQL_IGNORE_DIRTY_LOG): SQLite does not
        // sync the data file, so after a power cut only the log has the last transactions.
        roll_forward(dir, data)?;
    }
    let mut rebuilt = match dirty_reason(dir, data, options)? {
        Some(reason) => Some(logged_rebuild(dir, data, reason)?),
        None => {
            if !dir.join(WALLOG).exists() {
                create_log_file(&dir.join(WALLOG), &LogHeader::new(Uuid::new_v4(), 0, 0))?;
            }
            None
        }
    };
    // Sync clients need every log to open with a full image. A log this server wrote (its
    // generation record names it) or just rebuilt does; one from elsewhere may not.
    let mut header = read_header(&dir.join(WALLOG))?;
    let known = generation::read(dir).is_some_and(|r| r.names(header.log_id, header.start_frame_no));
    if rebuilt.is_none() && !known && !opens_with_image(&dir.join(WALLOG), &header, data)? {
        rebuilt = Some(logged_rebuild(dir, data, "the log does not open with a full image, which sync clients need")?);
        header = read_header(&dir.join(WALLOG))?;
    }
    let record = generation::for_log(dir, header.log_id, header.start_frame_no)?;
    let sentinel = dir.join(SENTINEL);
    File::create(&sentinel).and_then(|_| durable::sync_dir(dir)).map_err(|e| LogError::io(&sentinel, e))?;
    let logger = ReplicationLogger::open(dir, settings, record)?;
    Ok((logger, rebuilt))
}

fn logged_rebuild(dir: &Path, data: &Path, reason: &'static str) -> Result<Rebuild, LogError> {
    tracing::warn!(dir = %dir.display(), reason, "replication log cannot be used; rebuilding it from the data file");
    let rebuilt = rebuild(dir, data, reason)?;
    tracing::info!(dir = %dir.display(), pages = rebuilt.pages, took_ms = rebuilt.took.as_millis() as u64, "replication log rebuilt");
    Ok(rebuilt)
}

pub(super) fn read_header(path: &Path) -> Result<LogHeader, LogError> {
    let file = File::open(path).map_err(|e| LogError::io(path, e))?;
    read_log_header(&file, path)
}

/// Whether the log's first transaction carries every page of the database it describes
/// (pages 1 to its commit size, each once). An empty log does if the database is empty.
fn opens_with_image(path: &Path, header: &LogHeader, data: &Path) -> Result<bool, LogError> {
    if header.frame_count == 0 {
        return Ok(std::fs::metadata(data).map(|m| m.len() == 0).unwrap_or(true));
    }
    let file = File::open(path).map_err(|e| LogError::io(path, e))?;
    let mut pages = std::collections::HashSet::new();
    let mut frame = [0u8; 24];
    for index in 0..header.frame_count {
        file.read_exact_at(&mut frame, frame_offset(index)).map_err(|e| LogError::io(path, e))?;
        let fh = FrameHeader::decode(&frame);
        pages.insert(fh.page_no);
        if fh.size_after != 0 {
            return Ok(pages.len() as u64 == fh.size_after as u64 && (1..=fh.size_after).all(|p| pages.contains(&p)));
        }
    }
    Ok(false)
}

/// Marks a clean close: the log is complete, the sentinel goes (unless preserved).
pub fn close(logger: &ReplicationLogger, options: RecoveryOptions) -> Result<(), LogError> {
    logger.close()?;
    // SQLite did not sync the data file: from here on (without the sentinel, or with a log
    // that cannot be rolled forward from) it is trusted as it is, so it is synced now, with
    // its WAL should one remain.
    for file in [DATA, DATA_WAL] {
        let path = logger.dir().join(file);
        durable::sync_file(&path).map_err(|e| LogError::io(&path, e))?;
    }
    if logger.is_poisoned() {
        tracing::warn!(dir = %logger.dir().display(), "keeping the sentinel: the log misses a committed transaction and is rebuilt on the next open");
        return Ok(());
    }
    if options.preserve_sentinel {
        tracing::info!(dir = %logger.dir().display(), "keeping the sentinel: the next open rebuilds the log");
        return Ok(());
    }
    let sentinel = logger.dir().join(SENTINEL);
    match std::fs::remove_file(&sentinel) {
        Ok(()) => durable::sync_dir(logger.dir()).map_err(|e| LogError::io(logger.dir(), e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(LogError::io(&sentinel, e)),
    }
}

fn dirty_reason(dir: &Path, data: &Path, options: RecoveryOptions) -> Result<Option<&'static str>, LogError> {
    if dir.join(LOG_UNTRUSTED).exists() {
        // Even under LIBSQL_IGNORE_DIRTY_LOG: the log holds frames that must never be applied.
        return Ok(Some("the log is marked untrusted"));
    }
    if dir.join(SENTINEL).exists() && !options.ignore_dirty {
        return Ok(Some("the sentinel shows the last run did not shut down cleanly"));
    }
    let wallog = dir.join(WALLOG);
    let mut bytes = Vec::new();
    match File::open(&wallog) {
        Ok(file) => {
            file.take(LOG_HEADER_SIZE as u64).read_to_end(&mut bytes).map_err(|e| LogError::io(&wallog, e))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let has_data = std::fs::metadata(data).is_ok_and(|m| m.len() > 0);
            return Ok(has_data.then_some("the log is missing beside an existing data file"));
        }
        Err(e) => return Err(LogError::io(&wallog, e)),
    }
    Ok(match LogHeader::decode_any_version(&bytes) {
        Err(_) => Some("the log header is unreadable"),
        Ok(h) if h.version < 2 => Some("the log is older than version 2"),
        Ok(h) if LogHeader::decode(&bytes).is_err() => {
            tracing::warn!(version = h.version, page_size = h.page_size, "unsupported log header");
            Some("the log header has an unsupported version or page size")
        }
        Ok(_) => None,
    })
}

/// A crash between the two renames of a retire leaves `wallog.new` without `wallog`: the
/// retired log is already in `to_compact/`, so the new log is complete and only needs its name.
fn finish_interrupted_retire(dir: &Path) -> Result<(), LogError> {
    let new = dir.join(WALLOG_NEW);
    if new.exists() {
        let wallog = dir.join(WALLOG);
        if wallog.exists() {
            // The retire did not get as far as moving the old log: abandon the new one.
            std::fs::remove_file(&new).map_err(|e| LogError::io(&new, e))?;
        } else {
            std::fs::rename(&new, &wallog).map_err(|e| LogError::io(&new, e))?;
        }
        durable::sync_dir(dir).map_err(|e| LogError::io(dir, e))?;
    }
    Ok(())
}

/// Rebuilds the log from `data`: checkpoint SQLite's WAL into it, write a new log (new log_id,
/// start frame 0) holding every page as one transaction beside the old one, swap it in, and
/// drop the snapshots and retired logs of the old log.
pub fn rebuild(dir: &Path, data: &Path, reason: &'static str) -> Result<Rebuild, LogError> {
    let started = Instant::now();
    checkpoint_data_file(data)?;
    // The new log is made from the data file, which SQLite did not sync.
    durable::sync_file(data).map_err(|e| LogError::io(data, e))?;
    failpoint::check("recovery.after_checkpoint", data).map_err(|e| LogError::io(data, e))?;

    let new_path = dir.join(super::WALLOG_REBUILD);
    let (log, header, _) = new_log_with_image(&new_path, data)?;
    let pages = header.frame_count;
    let io = |p: &Path, e| LogError::io(p, e);
    // One sync for frames and header: nothing reads this file before the rename.
    log.write_all_at(&header.encode(), 0).and_then(|()| log.sync_all()).map_err(|e| io(&new_path, e))?;
    failpoint::check("recovery.before_swap", &new_path).map_err(|e| LogError::io(&new_path, e))?;
    let wallog = dir.join(WALLOG);
    std::fs::rename(&new_path, &wallog).map_err(|e| io(&new_path, e))?;
    durable::sync_dir(dir).map_err(|e| io(dir, e))?;
    failpoint::check("recovery.after_swap", &wallog).map_err(|e| LogError::io(&wallog, e))?;
    drop_old_log(dir, header.log_id, pages)?;
    Ok(Rebuild { reason, pages, took: started.elapsed() })
}

/// A new log file at `path` (new log_id, frame 0 on) holding a full image of `data` as its
/// first transaction; returned with its header counting the image, neither synced nor the
/// header written yet. Also the checksum of the image's last frame.
pub(super) fn new_log_with_image(path: &Path, data: &Path) -> Result<(File, LogHeader, u64), LogError> {
    let mut header = LogHeader::new(Uuid::new_v4(), 0, 0);
    // Nothing trusts this file before its header is written and synced and it is renamed
    // into place, so its creation needs no sync of its own.
    let log = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(path).map_err(|e| LogError::io(path, e))?;
    let target = ImageTarget { log: &log, log_path: path, first_index: 0, first_frame_no: 0, previous_checksum: header.start_checksum };
    let (pages, last_checksum) = write_image(target, data)?;
    header.frame_count = pages;
    Ok((log, header, last_checksum))
}

/// Once a new log (`log_id`, opening with an image of `image_pages` pages of `data`) is the
/// wallog: the old log's snapshots, retired logs and marks go, and the data file is recorded
/// durable through the image (it was synced before the image was taken), so a roll-forward
/// replays only what comes after it. The snapshots and retired logs are only moved aside
/// (renamed to `.dropped-*`, which nothing reads): freeing their blocks takes a while (some
/// 100 ms for 256 MB here), so it is left to `ReplicationLogger::remove_dropped`, which a reset
/// runs without the write gate, and to the logger's open (which follows every rebuild here, and
/// removes whatever a crash left aside).
pub(super) fn drop_old_log(dir: &Path, log_id: Uuid, image_pages: u64) -> Result<(), LogError> {
    let io = |p: &Path, e| LogError::io(p, e);
    for stale in [SNAPSHOTS_DIR, TO_COMPACT_DIR] {
        let path = dir.join(stale);
        let aside = dir.join(format!("{DROPPED_PREFIX}{stale}-{}", Uuid::new_v4()));
        match std::fs::rename(&path, &aside) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path, e)),
        }
    }
    let _ = std::fs::remove_file(dir.join(WALLOG_NEW));
    let _ = std::fs::remove_file(dir.join(LOG_UNTRUSTED));
    durable::sync_dir(dir).map_err(|e| io(dir, e))?;
    failpoint::check("log.dropped_aside", dir).map_err(|e| io(dir, e))?;
    if image_pages > 0 {
        synced::record_presynced(dir, SyncedThrough { log_id, start_frame_no: 0, frame_no: image_pages - 1 });
    }
    Ok(())
}

/// Moves everything in SQLite's WAL into the data file (a directory written by the libSQL
/// server may hold most pages in `data-wal`).
fn checkpoint_data_file(data: &Path) -> Result<(), LogError> {
    if !data.exists() {
        return Ok(());
    }
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = libsql_sys::Connection::open(data, flags, Sqlite3WalManager::new(), 0, None).map_err(|e| LogError::Sqlite(data.to_owned(), e))?;
    let busy: i64 = conn
        .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |row| row.get(0))
        .map_err(|e| LogError::Sqlite(data.to_owned(), e))?;
    if busy != 0 {
        return Err(LogError::CheckpointBusy(data.to_owned()));
    }
    Ok(())
}

/// What a roll-forward found in the log: for every page its last committed version (the
/// frame's index in the file), and the database size after the last committed transaction.
struct CommittedLog {
    pages: std::collections::BTreeMap<u32, u64>,
    db_pages: u32,
    /// Frames up to and including the last commit frame.
    frames: u64,
}

/// After a crash: makes `data` exactly the database as of the last transaction the log holds
/// durably. The log opens with a full image and holds every later transaction, fsynced
/// before SQLite committed it, while SQLite syncs the data file only at recorded points (see
/// [`synced`]). So whatever the data file holds after a power cut (an older state, even torn
/// pages), writing over it each page's last logged version since the recorded point (or
/// since the log's start), where it differs, and cutting it to the logged size repairs it.
///
/// Nothing is done, and the data file is trusted as it is, when the log is not this server's
/// (no generation record names it), is marked untrusted, or fails its checksum chain inside
/// its committed part: a broken log must never overwrite data. A crash inside a roll-forward
/// is harmless: the next open rolls forward again from the same log. Returns the pages
/// written.
pub fn roll_forward(dir: &Path, data: &Path) -> Result<u64, LogError> {
    let path = dir.join(WALLOG);
    let trust = |why: &str| {
        tracing::warn!(dir = %dir.display(), why, "not rolling the data file forward from the log; the data file is trusted as it is");
        Ok(0)
    };
    if dir.join(LOG_UNTRUSTED).exists() {
        return trust("the log is marked untrusted");
    }
    let file = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return trust("there is no log"),
        Err(e) => return Err(LogError::io(&path, e)),
    };
    let Ok(mut header) = read_log_header(&file, &path) else {
        return trust("the log header is unreadable");
    };
    if !generation::read(dir).is_some_and(|r| r.names(header.log_id, header.start_frame_no)) {
        return trust("no generation record names the log");
    }
    let start = synced_start(dir, &file, &header);
    let committed = match scan_committed(&file, &path, &header, start)? {
        Ok(committed) => committed,
        Err(corrupt) => return trust(&corrupt.to_string()),
    };
    // From a recorded point even with nothing after it: SQLite's WAL may still hold a
    // transaction that failed after reaching it, and must not be replayed.
    let known = committed.frames > 0 || start.index > 0;
    let written = if known { rewrite_data_file(data, &file, &path, &committed)? } else { 0 };
    // The header's count may lag the durable frames (it is not fsynced per commit); a log
    // kept as it is (LIBSQL_IGNORE_DIRTY_LOG) must not append over frames the data file holds.
    let log_end = committed.frames.max(start.index);
    if log_end > header.frame_count {
        header.frame_count = log_end;
        file.write_all_at(&header.encode(), 0).and_then(|()| file.sync_data()).map_err(|e| LogError::io(&path, e))?;
    }
    if written > 0 {
        tracing::warn!(dir = %dir.display(), pages = written, db_pages = committed.db_pages, "data file rolled forward from the log: it had lost committed transactions");
    }
    Ok(written)
}

/// Makes `data` the log's last state: every page the scanned part of the log wrote, in its
/// last version, where it differs; the logged size; fsynced. The log holds every transaction
/// SQLite's WAL may hold, so that WAL is simply dropped, before any page is written, so that
/// a later attempt never reads through a stale WAL. Returns the pages written.
fn rewrite_data_file(data: &Path, log: &File, log_path: &Path, committed: &CommittedLog) -> Result<u64, LogError> {
    for suffix in ["-wal", "-shm"] {
        let stale = sqlite_sibling(data, suffix);
        match std::fs::remove_file(&stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(LogError::io(&stale, e)),
        }
    }
    let out = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(data).map_err(|e| LogError::io(data, e))?;
    let mut logged = vec![0u8; PAGE_SIZE];
    let mut current = vec![0u8; PAGE_SIZE];
    let mut written = 0u64;
    for (&page_no, &index) in committed.pages.range(..=committed.db_pages) {
        log.read_exact_at(&mut logged, frame_offset(index) + FRAME_HEADER_SIZE as u64).map_err(|e| LogError::io(log_path, e))?;
        let at = (page_no as u64 - 1) * PAGE_SIZE as u64;
        let differs = match out.read_exact_at(&mut current, at) {
            Ok(()) => current != logged,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => true,
            Err(e) => return Err(LogError::io(data, e)),
        };
        if differs {
            out.write_all_at(&logged, at).map_err(|e| LogError::io(data, e))?;
            written += 1;
            if written == 1 {
                failpoint::check("recovery.mid_roll_forward", data).map_err(|e| LogError::io(data, e))?;
            }
        }
    }
    out.set_len(committed.db_pages as u64 * PAGE_SIZE as u64).map_err(|e| LogError::io(data, e))?;
    // Synced even when nothing differed: the pages may be only in the page cache, and from
    // here on the data file is trusted as it is until the log is rebuilt.
    out.sync_all().and_then(|()| durable::sync_parent(data)).map_err(|e| LogError::io(data, e))?;
    Ok(written)
}

/// Where a roll-forward starts walking the log, and the checksum the chain continues from.
#[derive(Clone, Copy)]
struct ScanStart {
    index: u64,
    checksum: u64,
    /// The database size at that point.
    db_pages: u32,
}

/// The frame after the one the data file is recorded durable through (see [`synced`]), if the
/// record names this log and that frame is there as recorded; otherwise the log's start.
fn synced_start(dir: &Path, file: &File, header: &LogHeader) -> ScanStart {
    let from_start = ScanStart { index: 0, checksum: header.start_checksum, db_pages: 0 };
    let Some(record) = synced::read(dir).filter(|r| r.log_id == header.log_id && r.start_frame_no == header.start_frame_no) else {
        return from_start;
    };
    let Some(index) = record.frame_no.checked_sub(header.start_frame_no) else {
        return from_start;
    };
    let mut bytes = [0u8; FRAME_HEADER_SIZE];
    if file.read_exact_at(&mut bytes, frame_offset(index)).is_err() {
        return from_start;
    }
    let frame = FrameHeader::decode(&bytes);
    if frame.frame_no != record.frame_no || frame.size_after == 0 {
        return from_start;
    }
    ScanStart { index: index + 1, checksum: frame.checksum, db_pages: frame.size_after }
}

/// SQLite's `-wal` or `-shm` file beside the database file `data`.
fn sqlite_sibling(data: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = data.as_os_str().to_owned();
    name.push(suffix);
    name.into()
}

/// Walks the log from its first frame along the checksum chain and frame_no sequence, past the
/// header's count (which is written without an fsync, so it may lag the durable frames) up to
/// the last frame that verifies, and keeps the transactions that end in a commit frame. A
/// frame inside the header's count that does not verify makes the log corrupt (inner `Err`).
fn scan_committed(file: &File, path: &Path, header: &LogHeader, start: ScanStart) -> Result<Result<CommittedLog, LogError>, LogError> {
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    reader.seek_relative(frame_offset(start.index) as i64).map_err(|e| LogError::io(path, e))?;
    let mut frame = vec![0u8; FRAME_SIZE];
    let mut sum = start.checksum;
    let mut pending: Vec<(u32, u64)> = Vec::new();
    let mut committed = CommittedLog { pages: std::collections::BTreeMap::new(), db_pages: start.db_pages, frames: 0 };
    let mut index = start.index;
    loop {
        match reader.read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(LogError::io(path, e)),
        }
        let fh = FrameHeader::decode(&frame[..FRAME_HEADER_SIZE]);
        let next = checksum(sum, &frame[FRAME_HEADER_SIZE..]);
        if fh.frame_no != header.start_frame_no + index || fh.checksum != next {
            break;
        }
        sum = next;
        pending.push((fh.page_no, index));
        if fh.size_after != 0 {
            committed.pages.extend(pending.drain(..));
            committed.db_pages = fh.size_after;
            committed.frames = index + 1;
        }
        index += 1;
    }
    if index < header.frame_count {
        let frame_no = header.start_frame_no + index;
        return Ok(Err(LogError::corrupt(path, Some(frame_no), "the checksum chain breaks inside the committed frames")));
    }
    Ok(Ok(committed))
}
