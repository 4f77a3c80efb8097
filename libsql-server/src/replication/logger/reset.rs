//! `reset-replication` on the logger: a new log built beside the live one from the data file,
//! caught up with what the live log committed meanwhile, swapped in and taken up in place.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::{frame_offset, LogState, ReplicationLogger};
use crate::durable;
use crate::replication::format::{checksum, FrameHeader, LogHeader, FRAME_SIZE};
use crate::replication::synced;
use crate::replication::{failpoint, generation, recovery, LogError, DROPPED_PREFIX, WALLOG, WALLOG_REBUILD};

/// Where the live log stood when the data file was pinned: its identity and committed frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPosition {
    log_id: Uuid,
    start_frame_no: u64,
    frame_count: u64,
}

/// A new log written beside the live one (`wallog.rebuild`), removed if dropped unfinished.
/// While it exists, compactions wait (they would replace the live log it catches up from).
pub struct PreparedReset<'a> {
    logger: &'a ReplicationLogger,
    path: PathBuf,
    file: File,
    header: LogHeader,
    last_checksum: u64,
    image_pages: u64,
    at: LogPosition,
    done: bool,
}

impl Drop for PreparedReset<'_> {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_file(&self.path);
        }
        self.logger.resetting.store(false, Ordering::Release);
    }
}

impl ReplicationLogger {
    /// Where the live log stands. Taken with the write gate held, so no commit is in flight.
    pub fn position(&self) -> LogPosition {
        let state = self.lock();
        LogPosition { log_id: state.header.log_id, start_frame_no: state.header.start_frame_no, frame_count: state.header.frame_count }
    }

    /// Writes a new log (new log_id, frame 0 on) opening with a full image of `data`, beside
    /// the live log. `data` must hold exactly the state of position `at` and stay so until
    /// this returns (the caller pins it: a read transaction begun on an empty SQLite WAL keeps
    /// any checkpoint from writing into it); writers go on meanwhile, into the live log.
    pub fn prepare_reset(&self, data: &Path, at: LogPosition) -> Result<PreparedReset<'_>, LogError> {
        // The new log's image is the data file: it must be durable before a roll-forward
        // would start after that image.
        durable::sync_file(data).map_err(|e| LogError::io(data, e))?;
        let path = self.dir.join(WALLOG_REBUILD);
        self.resetting.store(true, Ordering::Release);
        // The image reaches the disk here, without the write gate (and at the caller's
        // priority), so the swap, which writers wait for, syncs only the frames it catches up
        // and the header.
        let imaged = recovery::new_log_with_image(&path, data).and_then(|(file, header, last_checksum)| {
            file.sync_data().map(|()| (file, header, last_checksum)).map_err(|e| LogError::io(&path, e))
        });
        match imaged {
            Ok((file, header, last_checksum)) => {
                Ok(PreparedReset { logger: self, path, file, header, last_checksum, image_pages: header.frame_count, at, done: false })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                self.resetting.store(false, Ordering::Release);
                Err(e)
            }
        }
    }

    /// With the write gate held: appends the transactions the live log committed since the
    /// prepared log's image, makes the new log durable and swaps it in by rename, drops the
    /// snapshots and retired logs of the old one, and takes the new log up (a new generation).
    /// The old generation stays readable for sync clients part-way through it; a broken
    /// (poisoned) log works again. A failure before the rename leaves the old log; after it,
    /// the new one is taken up (or the log refuses writes until the next open rebuilds it).
    pub fn finish_reset(&self, mut prepared: PreparedReset<'_>) -> Result<(Uuid, u64, u64), LogError> {
        // No snapshot of the old log may land after the old ones are dropped.
        self.wait_for_compactions();
        // Checkpoints record their position in `synced` under this lock: not meanwhile.
        let mut synced = self.synced.lock().unwrap_or_else(|e| e.into_inner());
        self.catch_up(&mut prepared)?;
        let io = |p: &Path, e| LogError::io(p, e);
        let (path, file) = (&prepared.path, &prepared.file);
        // The image is synced already; one sync for the frames caught up and the header:
        // nothing reads this file before the rename.
        file.write_all_at(&prepared.header.encode(), 0).and_then(|()| file.sync_all()).map_err(|e| io(path, e))?;
        failpoint::check("reset.before_swap", path).map_err(|e| io(path, e))?;
        let wallog = self.dir.join(WALLOG);
        std::fs::rename(path, &wallog).map_err(|e| io(path, e))?;
        prepared.done = true;
        if let Err(e) = self.after_swap(&prepared) {
            self.follow_swapped_log(&e);
            return Err(e);
        }
        let generation = generation::for_log(&self.dir, prepared.header.log_id, 0)?;
        let mut state = self.lock();
        let outgoing = state.outgoing();
        *state = LogState::read(&self.dir, generation)?;
        *synced = synced::read(&self.dir);
        self.generation.store(generation.generation, Ordering::Release);
        self.retire_wanted.store(false, Ordering::Release);
        if outgoing.frame_count > 0 {
            self.supersede(outgoing);
        }
        self.mark_moved();
        Ok((state.header.log_id, generation.generation, prepared.image_pages))
    }

    /// Copies the live log's frames committed after the prepared image into the new log,
    /// renumbered after the image and chained on from it.
    fn catch_up(&self, prepared: &mut PreparedReset<'_>) -> Result<(), LogError> {
        let state = self.lock();
        let now =
            LogPosition { log_id: state.header.log_id, start_frame_no: state.header.start_frame_no, frame_count: state.header.frame_count };
        if (now.log_id, now.start_frame_no) != (prepared.at.log_id, prepared.at.start_frame_no) || now.frame_count < prepared.at.frame_count
        {
            return Err(LogError::Abandoned("the live log was replaced while the new one was built; try again".into()));
        }
        let live = self.dir.join(WALLOG);
        let mut frame = vec![0u8; FRAME_SIZE];
        for index in prepared.at.frame_count..now.frame_count {
            state.file.read_exact_at(&mut frame, frame_offset(index)).map_err(|e| LogError::io(&live, e))?;
            let old = FrameHeader::decode(&frame[..24]);
            prepared.last_checksum = checksum(prepared.last_checksum, &frame[24..]);
            let at = prepared.header.frame_count;
            FrameHeader { frame_no: at, checksum: prepared.last_checksum, page_no: old.page_no, size_after: old.size_after }
                .encode_into(&mut frame[..24]);
            prepared.file.write_all_at(&frame, frame_offset(at)).map_err(|e| LogError::io(&prepared.path, e))?;
            prepared.header.frame_count += 1;
        }
        Ok(())
    }

    /// After the new log is the wallog: the old log's snapshots and retired logs go (moved
    /// aside; [`Self::remove_dropped`] frees them), and the data file is recorded durable
    /// through the new log's image.
    fn after_swap(&self, prepared: &PreparedReset<'_>) -> Result<(), LogError> {
        let io = |p: &Path, e| LogError::io(p, e);
        durable::sync_dir(&self.dir).map_err(|e| io(&self.dir, e))?;
        failpoint::check("reset.after_swap", &self.dir).map_err(|e| io(&self.dir, e))?;
        recovery::drop_old_log(&self.dir, prepared.header.log_id, prepared.image_pages)
    }

    /// Frees what resets moved aside (the snapshots and retired logs of the logs they
    /// replaced). Run without the write gate: writers do not wait for it.
    pub fn remove_dropped(&self) {
        super::files::remove_trees(&self.dir, &[DROPPED_PREFIX]);
    }

    /// After a reset failed: if its new log was already swapped in, appending to the old one
    /// (no longer the `wallog`) would lose writes, so the new one is taken up, or, if even that
    /// fails, the log refuses writes until the next open rebuilds it.
    fn follow_swapped_log(&self, why: &LogError) {
        use std::os::unix::fs::MetadataExt;
        let mut state = self.lock();
        let path = self.dir.join(WALLOG);
        let same = match (state.file.metadata(), std::fs::metadata(&path)) {
            (Ok(ours), Ok(on_disk)) => (ours.dev(), ours.ino()) == (on_disk.dev(), on_disk.ino()),
            _ => false,
        };
        if same {
            return;
        }
        let taken_up = recovery::read_header(&path)
            .and_then(|header| generation::for_log(&self.dir, header.log_id, header.start_frame_no))
            .and_then(|generation| LogState::read(&self.dir, generation));
        match taken_up {
            Ok(new) => {
                self.generation.store(new.generation.generation, Ordering::Release);
                *state = new;
                self.mark_moved();
            }
            Err(e) => {
                state.poisoned = Some(format!("a reset failed after swapping in its new log ({why}), which could not be taken up: {e}"));
            }
        }
    }
}
