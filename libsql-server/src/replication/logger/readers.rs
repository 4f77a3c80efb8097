//! What the log's readers see: the current generation, the generations compaction superseded
//! lately (kept readable for sync clients part-way through them), the views sync and replica
//! feeds read frames from, and the watch that wakes replicas waiting for new frames.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{LogState, ReplicationLogger};
use crate::replication::feed::FeedView;
use crate::replication::format::LogHeader;
use crate::replication::WALLOG;

/// A superseded generation's log, kept open for sync clients part-way through it.
pub(super) struct Superseded {
    generation: u64,
    file: Arc<File>,
    pub(super) frame_count: u64,
    at: Instant,
}

impl LogState {
    /// The current generation, as it will be kept once superseded.
    pub(super) fn outgoing(&self) -> Superseded {
        Superseded {
            generation: self.generation.generation,
            file: self.file.clone(),
            frame_count: self.header.frame_count,
            at: Instant::now(),
        }
    }
}

/// How long a superseded generation stays readable, and how many at most: a client pulls a
/// transaction in one sync call (seconds, even for a full image), so this outlasts any pull
/// in progress while bounding the disk the old logs keep.
const SUPERSEDED_FOR: Duration = Duration::from_secs(60);
const KEEP_SUPERSEDED: usize = 4;

impl ReplicationLogger {
    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Keeps the outgoing generation readable for sync clients part-way through it, dropping
    /// those past their time or count.
    pub(super) fn supersede(&self, outgoing: Superseded) {
        let mut superseded = self.superseded.lock().unwrap_or_else(|e| e.into_inner());
        superseded.push_back(outgoing);
        let mut evicted = Vec::new();
        while superseded.len() > KEEP_SUPERSEDED || superseded.front().is_some_and(|s| s.at.elapsed() > SUPERSEDED_FOR) {
            evicted.extend(superseded.pop_front());
        }
        // Closing the last handle on a removed log frees its blocks (milliseconds per 10 MB):
        // not under the log's lock, which writers wait on.
        if !evicted.is_empty() {
            crate::blocking::drop_in_background(evicted);
        }
    }

    /// A generation compaction superseded lately: its log (readable though retired or
    /// removed) and its committed frames.
    pub fn superseded(&self, generation: u64) -> Option<(Arc<File>, u64)> {
        let superseded = self.superseded.lock().unwrap_or_else(|e| e.into_inner());
        superseded.iter().find(|s| s.generation == generation && s.at.elapsed() <= SUPERSEDED_FOR).map(|s| (s.file.clone(), s.frame_count))
    }

    /// What a sync reader needs to serve the current generation's frames: its number, the log
    /// file (readable even after it is retired) and the header as of now.
    pub fn sync_view(&self) -> (u64, Arc<File>, LogHeader) {
        let state = self.lock();
        (state.generation.generation, state.file.clone(), state.header)
    }

    /// The current log as replicas of the older protocol are served from it (see `feed`).
    pub fn feed_view(&self) -> FeedView {
        let state = self.lock();
        FeedView {
            path: self.dir.join(WALLOG),
            file: state.file.clone(),
            header: state.header,
            image_frames: state.image_frames,
            generation: state.generation.generation,
        }
    }

    /// Changes whenever the log moves: a commit, a compaction, a reset. Replicas waiting for
    /// frames wait on it.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.moved.subscribe()
    }

    pub(super) fn mark_moved(&self) {
        self.moved.send_modify(|n| *n = n.wrapping_add(1));
    }
}
