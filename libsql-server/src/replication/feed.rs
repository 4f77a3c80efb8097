//! What replicas of the older protocol (gRPC `wal_log.ReplicationLog`: libSQL server replicas,
//! and embedded replicas that fall back to it) pull: a log's committed frames from a frame_no
//! on, and a snapshot that brings a replica from anywhere to a consistent state.
//!
//! Frames go out exactly as the wallog holds them (a 24-byte header: frame_no, checksum, page
//! number, size after commit; then the page). Every log opens with a full image of the
//! database, so the snapshot is that image: a replica behind the log's start (compaction moved
//! it on), or ahead of its end (it followed another history), applies the image as one
//! transaction and goes on from the frame after it.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use uuid::Uuid;

use super::format::{LogHeader, FRAME_SIZE};
use super::logger::frame_offset;
use super::LogError;

/// One log as it stands: its file (readable even once retired or replaced) and header, and
/// how many frames its opening image has.
#[derive(Clone)]
pub struct FeedView {
    pub(super) path: PathBuf,
    pub(super) file: Arc<File>,
    pub(super) header: LogHeader,
    pub(super) image_frames: u64,
    pub(super) generation: u64,
}

/// What a replica asking for frames from `next_offset` gets.
#[derive(Debug)]
pub enum Frames {
    /// Whole frames in order, at least one.
    Frames(Vec<Bytes>),
    /// It has every committed frame.
    UpToDate,
    /// The log cannot bring it forward from there: it must apply the snapshot first.
    NeedSnapshot,
}

impl FeedView {
    pub fn log_id(&self) -> Uuid {
        self.header.log_id
    }

    /// The first frame_no of the log: its opening image starts there.
    pub fn start_frame_no(&self) -> u64 {
        self.header.start_frame_no
    }

    /// The sync generation this log is.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The frame_no of the last committed frame, if the log has one.
    pub fn last_frame_no(&self) -> Option<u64> {
        (self.header.frame_count > 0).then(|| self.header.next_frame_no() - 1)
    }

    /// At most `max` committed frames from `next_offset` on.
    pub fn frames_from(&self, next_offset: u64, max: usize) -> Result<Frames, LogError> {
        let end = self.header.next_frame_no();
        if next_offset < self.header.start_frame_no || next_offset > end {
            // Behind the log (compacted away), or ahead of it: a replica holding frames this
            // log never had can only be made consistent by a full image.
            return Ok(Frames::NeedSnapshot);
        }
        if next_offset == end {
            return Ok(Frames::UpToDate);
        }
        let count = (end - next_offset).min(max as u64);
        let first = next_offset - self.header.start_frame_no;
        Ok(Frames::Frames(self.read(first, count)?.into_iter().map(BytesMut::freeze).collect()))
    }

    /// Frames of the log's opening image, `count` at most from `done` frames after its
    /// beginning, **newest first** (replicas take the first frame's frame_no as where the
    /// snapshot leaves them). Only the frame sent last carries the transaction's size after
    /// commit, since replicas commit at the first frame that carries one. Empty once all were
    /// given; an error if the log has no image to give.
    pub fn snapshot_frames(&self, done: u64, count: u64) -> Result<Vec<Bytes>, LogError> {
        let image = self.image_frames;
        if image == 0 {
            return Err(LogError::corrupt(&self.path, Some(self.header.start_frame_no), "the log does not open with a full image"));
        }
        if done >= image {
            return Ok(Vec::new());
        }
        let count = count.min(image - done);
        // Newest first: the `count` frames that end `done` frames before the image's end.
        let first = image - done - count;
        let mut frames = self.read(first, count)?;
        // The image's length was found at open by its shape: each frame is checked to be the
        // image's (page i at index i - 1) before it is sent as such.
        for (i, frame) in frames.iter().enumerate() {
            let page_no = u32::from_le_bytes(frame[16..20].try_into().expect("a frame header"));
            if u64::from(page_no) != first + i as u64 + 1 {
                return Err(LogError::corrupt(
                    &self.path,
                    Some(self.header.start_frame_no + first + i as u64),
                    "not a frame of the log's opening image",
                ));
            }
        }
        frames.reverse();
        for frame in frames.iter_mut() {
            frame[20..24].fill(0);
        }
        if done + count == image {
            // An image holds pages 1..=n, one frame each: its size after commit is n.
            let last = frames.last_mut().expect("at least one frame");
            last[20..24].copy_from_slice(&(image as u32).to_le_bytes());
        }
        Ok(frames.into_iter().map(BytesMut::freeze).collect())
    }

    /// How many frames the snapshot has.
    pub fn snapshot_len(&self) -> u64 {
        self.image_frames
    }

    /// `count` frames from index `first` of the file, each in its own buffer.
    fn read(&self, first: u64, count: u64) -> Result<Vec<BytesMut>, LogError> {
        let mut all = BytesMut::zeroed(count as usize * FRAME_SIZE);
        self.file.read_exact_at(&mut all, frame_offset(first)).map_err(|e| LogError::io(&self.path, e))?;
        let mut frames = Vec::with_capacity(count as usize);
        while !all.is_empty() {
            frames.push(all.split_to(FRAME_SIZE));
        }
        Ok(frames)
    }
}
