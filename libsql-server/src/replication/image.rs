//! Writing a full image of a database file into a log as one transaction: how every log (and
//! so every generation) begins.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::format::{checksum, FrameHeader, FRAME_SIZE, PAGE_SIZE};
use super::logger::frame_offset;
use super::{failpoint, pagecache, LogError};

/// Where the image goes in the log, and the chain it continues.
pub struct ImageTarget<'a> {
    pub log: &'a File,
    pub log_path: &'a Path,
    /// Index (from the log's start) of the image's first frame.
    pub first_index: u64,
    pub first_frame_no: u64,
    pub previous_checksum: u64,
}

/// Appends every page of `data` (which must hold the whole database: SQLite's WAL
/// checkpointed into it) to the log as one transaction, the last frame carrying the page
/// count. Does not fsync. Returns (pages written, checksum of the last frame).
pub fn write_image(target: ImageTarget<'_>, data: &Path) -> Result<(u64, u64), LogError> {
    let io = |p: &Path, e| LogError::io(p, e);
    let bytes = match std::fs::metadata(data) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io(data, e)),
    };
    if bytes % PAGE_SIZE as u64 != 0 {
        return Err(LogError::corrupt(data, None, format!("data file size {bytes} is not a multiple of the page size")));
    }
    let pages = bytes / PAGE_SIZE as u64;
    if pages == 0 {
        return Ok((0, target.previous_checksum));
    }
    let source = File::open(data).map_err(|e| io(data, e))?;
    let mut page_size = [0u8; 2];
    source.read_exact_at(&mut page_size, 16).map_err(|e| io(data, e))?;
    if u16::from_be_bytes(page_size) as usize != PAGE_SIZE {
        return Err(LogError::corrupt(data, None, format!("page size {} is not {PAGE_SIZE}", u16::from_be_bytes(page_size))));
    }
    const CHUNK: u64 = 256;
    let mut buf = vec![0u8; CHUNK as usize * FRAME_SIZE];
    let mut sum = target.previous_checksum;
    let mut done = 0u64;
    let mut dropped_below = frame_offset(target.first_index);
    while done < pages {
        let n = CHUNK.min(pages - done);
        for (i, frame) in buf.chunks_exact_mut(FRAME_SIZE).take(n as usize).enumerate() {
            let page = done + i as u64;
            source.read_exact_at(&mut frame[24..], page * PAGE_SIZE as u64).map_err(|e| io(data, e))?;
            sum = checksum(sum, &frame[24..]);
            let last = page + 1 == pages;
            FrameHeader {
                frame_no: target.first_frame_no + page,
                checksum: sum,
                page_no: page as u32 + 1,
                size_after: if last { pages as u32 } else { 0 },
            }
            .encode_into(&mut frame[..24]);
        }
        let at = frame_offset(target.first_index + done);
        let end = at + n * FRAME_SIZE as u64;
        target.log.write_all_at(&buf[..n as usize * FRAME_SIZE], at).map_err(|e| io(target.log_path, e))?;
        // A large image streams through a small window of the page cache.
        pagecache::start_writeback(target.log, at, end);
        pagecache::drop_behind(target.log, &mut dropped_below, end, true);
        done += n;
        if done < pages {
            failpoint::check("image.mid_frames", target.log_path).map_err(|e| io(target.log_path, e))?;
        }
    }
    Ok((pages, sum))
}
