//! The replication logger of one primary namespace: appends committed transactions to the
//! `wallog`, and retires a full log to `to_compact/` so it becomes a snapshot.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

use super::format::{checksum, FrameHeader, LogHeader, SnapshotHeader, FRAME_SIZE, LOG_HEADER_SIZE};
use super::generation::{self, GenerationRecord};
use super::synced::{self, SyncedThrough};
use super::image::{write_image, ImageTarget};
use super::{compaction, failpoint, pagecache, LogError, SNAPSHOTS_DIR, TO_COMPACT_DIR, WALLOG};
use crate::durable;

mod files;
mod readers;
mod reset;
mod state;

use files::{count_files, mark_untrusted, preallocate, remove_leftovers};
pub(super) use files::{create_log_file, frame_offset, read_log_header};

use readers::Superseded;
pub use reset::{LogPosition, PreparedReset};

/// When a log is retired into a snapshot.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSettings {
    /// Retire once the log holds at least this many frames.
    pub max_log_frames: Option<u64>,
    /// Retire a non-empty log this long after it was started.
    pub max_log_duration: Option<Duration>,
}

impl LogSettings {
    /// From `--max-log-size` (MB) and `--max-log-duration` (seconds).
    pub fn from_flags(max_log_size_mb: u64, max_log_duration_s: Option<f64>) -> Self {
        LogSettings {
            max_log_frames: (max_log_size_mb > 0).then(|| (max_log_size_mb * 1_000_000).div_ceil(FRAME_SIZE as u64)),
            max_log_duration: max_log_duration_s.filter(|s| *s > 0.0).map(Duration::from_secs_f64),
        }
    }
}

pub struct ReplicationLogger {
    dir: PathBuf,
    settings: LogSettings,
    state: Mutex<LogState>,
    /// Snapshot builds running in the background; joined on close.
    compactions: Mutex<Vec<JoinHandle<()>>>,
    /// Held while a snapshot is written: one at a time, so each sees the snapshots before it
    /// (which it may cover) finished.
    snapshot_writer: Arc<Mutex<()>>,
    /// The log is full: the next chance, it should be retired (see [`Self::retire_with_image`]).
    retire_wanted: AtomicBool,
    /// A reset is building the log's successor: no compaction replaces the log meanwhile.
    resetting: AtomicBool,
    /// The last position recorded in `synced`: held while recording, so a checkpoint and a
    /// compaction of this namespace take turns, and an unchanged position costs no fsync.
    synced: Mutex<Option<SyncedThrough>>,
    /// What the log has written since it opened (see [`LogStats`]).
    written: Arc<Written>,
    /// Generations compaction superseded lately, still readable: a sync client part-way
    /// through one gets the rest of it before it moves on (see `sync::pull`).
    superseded: Mutex<VecDeque<Superseded>>,
    /// The current generation's number, readable without the log's lock (which a commit holds
    /// through its fsync, and a compaction through a full image).
    generation: AtomicU64,
    /// Bumped whenever the log moves (see [`Self::watch`]).
    moved: tokio::sync::watch::Sender<u64>,
}

struct LogState {
    /// Shared with readers serving frames, which keep reading a retired log through it.
    file: Arc<File>,
    generation: GenerationRecord,
    header: LogHeader,
    /// Checksum of the last committed frame (the header's start checksum if none).
    last_checksum: u64,
    /// Set when a committed transaction could not be logged: the log has a hole and takes no
    /// more writes until it is rebuilt.
    poisoned: Option<String>,
    started_at: Instant,
    /// Frames of the full image the log opens with (0 if it does not open with one): the
    /// frames after it are the logged changes that decide when the log is full.
    image_frames: u64,
    /// The database's size in pages after the last committed transaction: what the next
    /// log's opening image will cost.
    db_pages: u64,
    /// Bytes of the file already written (frames or zero fill). Appends inside it change no
    /// file size, so their fdatasync flushes data only, not the filesystem's metadata journal.
    allocated: u64,
    /// Bytes of the file below which its durable pages were dropped from the page cache.
    uncached_below: u64,
    /// Set by a clean close: a write still in flight then must not commit, since the data
    /// file was synced and the sentinel goes.
    closed: bool,
    buf: Vec<u8>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LogStats {
    pub log_id: String,
    pub start_frame_no: u64,
    pub frame_count: u64,
    /// The frame_no of the last committed frame, if the log has ever held one.
    pub last_frame_no: Option<u64>,
    /// The sync generation: this log, which opens with a full image.
    pub generation: u64,
    pub wallog_bytes: u64,
    pub snapshot_count: usize,
    pub pending_compactions: usize,
    /// The log is full and waits for a compaction to retire it.
    pub compaction_wanted: bool,
    /// Since the log was opened (this process): compactions, frames of transactions logged,
    /// frames of opening images and frames written into snapshots. The log's write
    /// amplification is (transaction + image + snapshot frames) / transaction frames.
    pub compactions: u64,
    pub transaction_frames: u64,
    pub image_frames: u64,
    pub snapshot_frames: u64,
    pub poisoned: Option<String>,
}

/// Counters behind the `LogStats` of what the log wrote.
#[derive(Default)]
struct Written {
    compactions: AtomicU64,
    transaction_frames: AtomicU64,
    image_frames: AtomicU64,
    snapshot_frames: AtomicU64,
}

impl ReplicationLogger {
    /// Opens the `wallog` of namespace directory `dir`, which recovery has judged sound.
    pub(super) fn open(dir: &Path, settings: LogSettings, generation: GenerationRecord) -> Result<Arc<Self>, LogError> {
        let logger = Arc::new(ReplicationLogger {
            dir: dir.to_owned(),
            settings,
            state: Mutex::new(LogState::read(dir, generation)?),
            compactions: Mutex::new(Vec::new()),
            snapshot_writer: Arc::default(),
            superseded: Mutex::default(),
            written: Arc::default(),
            retire_wanted: AtomicBool::new(false),
            resetting: AtomicBool::new(false),
            synced: Mutex::new(synced::read(dir)),
            generation: AtomicU64::new(generation.generation),
            moved: tokio::sync::watch::channel(0).0,
        });
        // Finish what a previous run left: redundant snapshots, and the snapshots of logs it
        // retired but did not get to write.
        compaction::prune(dir, true)?;
        remove_leftovers(dir);
        for retired in compaction::pending(dir) {
            logger.spawn_snapshot(retired);
        }
        Ok(logger)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn is_poisoned(&self) -> bool {
        self.lock().poisoned.is_some()
    }

    /// Marks the log broken: a committed transaction is missing from it.
    pub fn poison(&self, why: String) {
        tracing::error!(dir = %self.dir.display(), error = %why, "replication log broken; writes are refused until it is rebuilt");
        self.lock().poisoned = Some(why);
    }

    pub fn log_id(&self) -> Uuid {
        self.lock().header.log_id
    }

    /// The log and its last committed frame, if it has one: what a checkpoint that starts
    /// now puts into the data file.
    pub fn committed_position(&self) -> Option<SyncedThrough> {
        let state = self.lock();
        let h = &state.header;
        let frame_no = h.next_frame_no().checked_sub(1).filter(|_| h.frame_count > 0)?;
        Some(SyncedThrough { log_id: h.log_id, start_frame_no: h.start_frame_no, frame_no })
    }

    /// Logs one transaction ahead of SQLite's commit of it: encodes `pages` ((page number,
    /// bytes), the last one carrying `size_after`), writes them past the log's committed end
    /// and fdatasyncs them. [`StagedCommit::commit`] then runs SQLite's commit and counts the
    /// frames in the header. The log's lock is held throughout, so the log's order is SQLite's
    /// commit order.
    ///
    /// The log is the durable record of a commit: SQLite does not sync (`synchronous=OFF`), so
    /// a power cut can leave the data file behind or torn, and the next open rewrites it from
    /// the log (see `recovery`). So the log holds every transaction the data file may hold,
    /// durably, before SQLite commits it.
    ///
    /// Fails if the log is poisoned or the frames cannot be written durably; the transaction
    /// must then not commit, and its frames are discarded (see [`Self::discard_staged`]).
    pub fn stage_commit(&self, pages: &[(u32, &[u8])], size_after: u32) -> Result<StagedCommit<'_>, LogError> {
        let mut state = self.lock();
        if let Some(why) = &state.poisoned {
            return Err(LogError::Poisoned(why.clone()));
        }
        if state.closed {
            return Err(LogError::Closed);
        }
        let frames = pages.len() as u64;
        let last_checksum = encode_frames(&mut state, pages, size_after);
        let at = frame_offset(state.header.frame_count);
        let LogState { file, allocated, buf, .. } = &mut *state;
        let end = at + buf.len() as u64;
        if frames > 0 {
            let durable = preallocate(file, allocated, end)
                .and_then(|()| file.write_all_at(buf, at))
                .and_then(|()| failpoint::check("log.write", &self.dir))
                .and_then(|()| file.sync_data());
            if let Err(e) = durable {
                let e = LogError::io(&self.dir.join(WALLOG), e);
                self.discard_staged(&mut state, at, &e);
                return Err(e);
            }
        }
        Ok(StagedCommit { logger: self, state, frames, last_checksum, size_after, at, end })
    }

    /// After a staged transaction failed: zeroes its frames, durably, so the checksum chain a
    /// roll-forward follows ends before them. If even that fails, the log is poisoned and
    /// marked untrusted, so that no roll-forward applies a transaction that did not commit.
    fn discard_staged(&self, state: &mut LogState, at: u64, why: &dyn std::fmt::Display) {
        // Every staged frame, not just the first: a later transaction may rewrite the first
        // one identically, and the rest would then continue its checksum chain.
        state.buf.fill(0);
        let LogState { file, buf, .. } = &*state;
        let zeroed = failpoint::check("log.discard", &self.dir)
            .and_then(|()| file.write_all_at(buf, at))
            .and_then(|()| file.sync_data());
        if let Err(e) = zeroed {
            let why = format!("the frames of a failed transaction could not be discarded ({e}) after: {why}");
            tracing::error!(dir = %self.dir.display(), error = %why, "replication log broken; writes are refused until it is rebuilt");
            if let Err(e) = mark_untrusted(&self.dir) {
                tracing::error!(dir = %self.dir.display(), error = %e, "could not mark the log untrusted either");
            }
            state.poisoned = Some(why);
        }
    }

    /// Counts `frames` durable frames in the header, then retires the log if it is full.
    /// The frames are durable and SQLite committed them, so they count in memory even if the
    /// header cannot be written (the caller then poisons the log; a close must not cut them).
    fn publish(&self, state: &mut LogState, frames: u64, last_checksum: u64, size_after: u32) -> Result<(), LogError> {
        state.header.frame_count += frames;
        state.last_checksum = last_checksum;
        state.db_pages = u64::from(size_after);
        self.written.transaction_frames.fetch_add(frames, Ordering::Relaxed);
        failpoint::check("log.header", &self.dir)
            .and_then(|()| state.file.write_all_at(&state.header.encode(), 0))
            .map_err(|e| LogError::io(&self.dir.join(WALLOG), e))?;

        if self.should_retire(state) {
            self.retire_wanted.store(true, Ordering::Release);
        }
        self.mark_moved();
        Ok(())
    }

    /// Whether the log is full and waits for [`Self::retire_with_image`].
    pub fn retire_wanted(&self) -> bool {
        self.retire_wanted.load(Ordering::Acquire)
    }

    /// Compaction and a new generation: retires the current log (it becomes a snapshot in the
    /// background) and opens the new log with a full image of `data`. The caller holds the
    /// namespace's write lock and has checkpointed SQLite's WAL into `data`, so `data` is
    /// exactly the database as of the log's last frame.
    pub fn retire_with_image(&self, data: &Path) -> Result<(), LogError> {
        if self.resetting.load(Ordering::Acquire) {
            // The reset's new log replaces this one; the flag stays for after it.
            return Ok(());
        }
        let mut state = self.lock();
        if let Some(why) = &state.poisoned {
            return Err(LogError::Poisoned(why.clone()));
        }
        if state.header.frame_count > 0 {
            let outgoing = state.outgoing();
            // SQLite does not sync the data file (the log is the durable copy): once the log
            // retires, until its successor holds its image, the data file is the only one.
            durable::sync_file(data).map_err(|e| LogError::io(data, e))?;
            if let Err(e) = self.retire(&mut state) {
                // Failing before the old log moved leaves it in place to go on with. Failing
                // after leaves no log to append to: refuse writes until a rebuild.
                if !self.dir.join(WALLOG).exists() {
                    state.poisoned = Some(format!("the log was retired but its successor was not put in place: {e}"));
                }
                return Err(e);
            }
            if let Err(e) = self.open_with_image(&mut state, data) {
                state.poisoned = Some(format!("the new log could not be given its opening image: {e}"));
                return Err(e);
            }
            self.written.compactions.fetch_add(1, Ordering::Relaxed);
            self.supersede(outgoing);
            self.mark_moved();
        }
        self.retire_wanted.store(false, Ordering::Release);
        Ok(())
    }

    fn open_with_image(&self, state: &mut LogState, data: &Path) -> Result<(), LogError> {
        let path = self.dir.join(WALLOG);
        let target = ImageTarget {
            log: &state.file,
            log_path: &path,
            first_index: 0,
            first_frame_no: state.header.start_frame_no,
            previous_checksum: state.last_checksum,
        };
        let (pages, last_checksum) = write_image(target, data)?;
        state.allocated = state.allocated.max(frame_offset(pages));
        if pages > 0 {
            state.file.sync_data().map_err(|e| LogError::io(&path, e))?;
            let LogState { file, uncached_below, .. } = &mut *state;
            pagecache::drop_behind(file, uncached_below, frame_offset(pages), false);
            let mut header = state.header;
            header.frame_count = pages;
            state.file.write_all_at(&header.encode(), 0).map_err(|e| LogError::io(&path, e))?;
            state.header = header;
            state.last_checksum = last_checksum;
        }
        state.image_frames = pages;
        state.db_pages = pages;
        self.written.image_frames.fetch_add(pages, Ordering::Relaxed);
        state.generation = generation::for_log(&self.dir, state.header.log_id, state.header.start_frame_no)?;
        self.generation.store(state.generation.generation, Ordering::Release);
        if pages > 0 {
            // The data file was synced before the old log retired, and the image is it.
            let h = state.header;
            self.record_data_synced(data, SyncedThrough { log_id: h.log_id, start_frame_no: h.start_frame_no, frame_no: h.start_frame_no + pages - 1 });
        }
        tracing::info!(dir = %self.dir.display(), generation = state.generation.generation, pages, "new generation opened with a full image");
        Ok(())
    }

    /// Records (see [`synced`]) that the data file `data` holds everything through
    /// `position`, fsyncing it first, unless that is already recorded.
    pub fn record_data_synced(&self, data: &Path, position: SyncedThrough) {
        let mut recorded = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        if *recorded != Some(position) && synced::record(&self.dir, data, position) {
            *recorded = Some(position);
        }
    }

    /// Full when the changes logged after the opening image reach the flag's size (or the
    /// flag's age passed) *and* at least the database's size: retiring costs a new image of
    /// the database (and a snapshot at most as large), so compactions come at most once per
    /// database's worth of changes and write at most twice more than the changes themselves.
    fn should_retire(&self, state: &LogState) -> bool {
        let changes = state.header.frame_count.saturating_sub(state.image_frames);
        changes > 0
            && changes >= state.db_pages
            && (self.settings.max_log_frames.is_some_and(|max| changes >= max)
                || self.settings.max_log_duration.is_some_and(|d| state.started_at.elapsed() >= d))
    }

    /// Moves the current log to `to_compact/` and continues in a fresh one at the next frame_no
    /// (same log_id, chain continued). A crash at any step leaves either the old log in place
    /// or the retired one beside a complete new one; `wallog.new` left alone is finished on
    /// open. The snapshot is written off the write path, in the background.
    fn retire(&self, state: &mut LogState) -> Result<(), LogError> {
        let dir = &self.dir;
        let io = |p: &Path, e| LogError::io(p, e);
        let old = state.header;
        let retired_name = SnapshotHeader {
            log_id: old.log_id,
            start_frame_no: old.start_frame_no,
            end_frame_no: old.next_frame_no() - 1,
            frame_count: 0,
            size_after: 0,
        }
        .file_name();
        failpoint::check("compaction.before_retire", dir).map_err(|e| LogError::io(dir, e))?;

        let to_compact = dir.join(TO_COMPACT_DIR);
        std::fs::create_dir_all(&to_compact).map_err(|e| io(&to_compact, e))?;
        durable::sync_dir(dir).map_err(|e| io(dir, e))?;
        let new_header = LogHeader::new(old.log_id, old.next_frame_no(), state.last_checksum);
        let new_path = dir.join(super::WALLOG_NEW);
        let file = create_log_file(&new_path, &new_header)?;
        failpoint::check("compaction.after_new_log", dir).map_err(|e| LogError::io(dir, e))?;

        let wallog = dir.join(WALLOG);
        let retired = to_compact.join(&retired_name);
        std::fs::rename(&wallog, &retired).map_err(|e| io(&wallog, e))?;
        durable::sync_dir(&to_compact).map_err(|e| io(&to_compact, e))?;
        failpoint::check("compaction.after_retire", dir).map_err(|e| LogError::io(dir, e))?;
        std::fs::rename(&new_path, &wallog).map_err(|e| io(&new_path, e))?;
        durable::sync_dir(dir).map_err(|e| io(dir, e))?;

        state.file = Arc::new(file);
        state.header = new_header;
        state.allocated = LOG_HEADER_SIZE as u64;
        state.uncached_below = 0;
        state.started_at = Instant::now();
        state.image_frames = 0;
        tracing::info!(dir = %dir.display(), retired = %retired_name, "log retired for compaction");
        self.spawn_snapshot(retired);
        Ok(())
    }

    fn spawn_snapshot(&self, retired: PathBuf) {
        let dir = self.dir.clone();
        let writer = self.snapshot_writer.clone();
        let written = self.written.clone();
        let handle = std::thread::Builder::new()
            .name("sqld-compaction".into())
            .spawn(move || {
                let _one_at_a_time = writer.lock().unwrap_or_else(|e| e.into_inner());
                match compaction::write_snapshot(&dir, &retired) {
                    Ok(frames) => _ = written.snapshot_frames.fetch_add(frames, Ordering::Relaxed),
                    Err(e) => tracing::error!(retired = %retired.display(), error = %e, "writing a snapshot failed; retried on next open"),
                }
            })
            .expect("spawning a compaction thread");
        let mut compactions = self.compactions.lock().unwrap_or_else(|e| e.into_inner());
        compactions.retain(|h| !h.is_finished());
        compactions.push(handle);
    }

    /// Waits for background snapshot builds (tests, close).
    pub fn wait_for_compactions(&self) {
        let handles: Vec<_> = std::mem::take(&mut *self.compactions.lock().unwrap_or_else(|e| e.into_inner()));
        for h in handles {
            let _ = h.join();
        }
    }

    pub fn stats(&self) -> LogStats {
        let state = self.lock();
        let h = &state.header;
        LogStats {
            log_id: h.log_id.hyphenated().to_string(),
            start_frame_no: h.start_frame_no,
            frame_count: h.frame_count,
            last_frame_no: h.next_frame_no().checked_sub(1),
            generation: state.generation.generation,
            wallog_bytes: frame_offset(h.frame_count),
            snapshot_count: count_files(&self.dir.join(SNAPSHOTS_DIR), "snap"),
            pending_compactions: compaction::pending(&self.dir).len(),
            compaction_wanted: self.retire_wanted(),
            compactions: self.written.compactions.load(Ordering::Relaxed),
            transaction_frames: self.written.transaction_frames.load(Ordering::Relaxed),
            image_frames: self.written.image_frames.load(Ordering::Relaxed),
            snapshot_frames: self.written.snapshot_frames.load(Ordering::Relaxed),
            poisoned: state.poisoned.clone(),
        }
    }

    /// Makes the log durable for a clean close: finishes snapshots, drops the zero fill past
    /// the last frame (the file is then exactly header and frames) and syncs the file.
    pub fn close(&self) -> Result<(), LogError> {
        self.wait_for_compactions();
        let mut state = self.lock();
        state.closed = true;
        let end = frame_offset(state.header.frame_count);
        let path = self.dir.join(WALLOG);
        state
            .file
            .write_all_at(&state.header.encode(), 0)
            .and_then(|()| state.file.set_len(end))
            .and_then(|()| state.file.sync_all())
            .map_err(|e| LogError::io(&path, e))?;
        state.allocated = end;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}



/// A transaction written into the log but not yet counted (see
/// [`ReplicationLogger::stage_commit`]); holds the log's lock.
pub struct StagedCommit<'a> {
    logger: &'a ReplicationLogger,
    state: std::sync::MutexGuard<'a, LogState>,
    frames: u64,
    last_checksum: u64,
    size_after: u32,
    /// Where the staged frames start and end in the file.
    at: u64,
    end: u64,
}

impl StagedCommit<'_> {
    /// Runs SQLite's commit. If it succeeds, the staged (already durable) frames are counted
    /// in the header, which is not fsynced: a roll-forward follows the checksum chain past a
    /// stale count. If it fails, the staged frames are discarded. A header that cannot be
    /// written poisons the log: writes are refused until the next open, which rolls the
    /// durable frames forward and rebuilds.
    pub fn commit<E>(self, commit: impl FnOnce() -> Result<usize, E>) -> Result<usize, E> {
        let StagedCommit { logger, mut state, frames, last_checksum, size_after, at, end } = self;
        let result = commit();
        if frames == 0 {
            return result;
        }
        match result {
            Err(e) => {
                logger.discard_staged(&mut state, at, &"SQLite's commit failed");
                Err(e)
            }
            Ok(written) => {
                let LogState { file, uncached_below, .. } = &mut *state;
                pagecache::drop_behind(file, uncached_below, end, false);
                if let Err(e) = logger.publish(&mut state, frames, last_checksum, size_after) {
                    tracing::error!(dir = %logger.dir.display(), error = %e, "a committed transaction could not be counted in the log header; the log takes no more writes until rebuilt");
                    state.poisoned = Some(e.to_string());
                }
                Ok(written)
            }
        }
    }
}

/// Encodes `pages` as the frames that follow the log's last one into the state's buffer, and
/// returns the checksum of the last.
fn encode_frames(state: &mut LogState, pages: &[(u32, &[u8])], size_after: u32) -> u64 {
    let first = state.header.next_frame_no();
    let mut sum = state.last_checksum;
    state.buf.clear();
    state.buf.resize(pages.len() * FRAME_SIZE, 0);
    for (i, ((page_no, page), frame)) in pages.iter().zip(state.buf.chunks_exact_mut(FRAME_SIZE)).enumerate() {
        sum = checksum(sum, page);
        let last = i + 1 == pages.len();
        FrameHeader { frame_no: first + i as u64, checksum: sum, page_no: *page_no, size_after: if last { size_after } else { 0 } }
            .encode_into(&mut frame[..24]);
        frame[24..].copy_from_slice(page);
    }
    sum
}
