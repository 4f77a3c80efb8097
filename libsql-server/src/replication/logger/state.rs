//! Reading a log's state from its file: where its frames end, how it opens.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::{frame_offset, read_log_header, LogState};
use crate::replication::format::{FrameHeader, LogHeader};
use crate::replication::generation::GenerationRecord;
use crate::replication::{LogError, WALLOG};

impl LogState {
    /// The state of the `wallog` of `dir`, which recovery has judged sound.
    pub(super) fn read(dir: &Path, generation: GenerationRecord) -> Result<Self, LogError> {
        let path = dir.join(WALLOG);
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(|e| LogError::io(&path, e))?;
        let header = read_log_header(&file, &path)?;
        let last_checksum = if header.frame_count == 0 {
            header.start_checksum
        } else {
            let mut frame = [0u8; 24];
            let at = frame_offset(header.frame_count - 1);
            file.read_exact_at(&mut frame, at)
                .map_err(|_| LogError::corrupt(&path, Some(header.next_frame_no() - 1), "header counts more frames than the file holds"))?;
            FrameHeader::decode(&frame).checksum
        };
        let allocated = file.metadata().map_err(|e| LogError::io(&path, e))?.len();
        let (image_frames, db_pages) = opening_image(&file, &header, &path)?;
        Ok(LogState {
            file: Arc::new(file),
            generation,
            header,
            last_checksum,
            poisoned: None,
            started_at: Instant::now(),
            image_frames,
            db_pages,
            allocated,
            uncached_below: 0,
            closed: false,
            buf: Vec::new(),
        })
    }
}

/// How the committed frames of a log begin: the number of frames of its opening full image
/// (0 if its first transaction is not one), and the database's size after its last
/// transaction. Reads frame headers only, and for an image as this server writes them (page
/// `i` at index `i - 1`, committing at its last page) only a few: its end is found by
/// bisection, so opening a namespace does not read its whole image. Any other first
/// transaction is walked to its commit.
fn opening_image(file: &File, header: &LogHeader, path: &Path) -> Result<(u64, u64), LogError> {
    let read = |index: u64| {
        let mut frame = [0u8; 24];
        file.read_exact_at(&mut frame, frame_offset(index))
            .map_err(|_| LogError::corrupt(path, Some(header.start_frame_no + index), "header counts more frames than the file holds"))
            .map(|()| FrameHeader::decode(&frame))
    };
    if header.frame_count == 0 {
        return Ok((0, 0));
    }
    let db_pages = u64::from(read(header.frame_count - 1)?.size_after);
    let in_image = |index: u64, fh: &FrameHeader| u64::from(fh.page_no) == index + 1 && fh.size_after == 0;
    if in_image(0, &read(0)?) {
        // Frames 0..=lo are inside an image; hi is past its last uncommitted page.
        let (mut lo, mut hi) = (0, header.frame_count);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if in_image(mid, &read(mid)?) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if hi < header.frame_count {
            let end = read(hi)?;
            if u64::from(end.page_no) == hi + 1 && u64::from(end.size_after) == hi + 1 {
                return Ok((hi + 1, db_pages));
            }
        }
    }
    let (mut highest, mut count) = (0u32, 0u64);
    for index in 0..header.frame_count {
        let fh = read(index)?;
        highest = highest.max(fh.page_no);
        count += 1;
        if fh.size_after != 0 {
            // An image writes each page once: as many frames as pages, none past the size.
            let image = count == u64::from(fh.size_after) && highest == fh.size_after;
            return Ok((if image { count } else { 0 }, db_pages));
        }
    }
    Ok((0, db_pages))
}
