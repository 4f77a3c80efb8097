//! Serving a generation's frames to sync (v2) clients, straight from the wallog.
//!
//! Sync frame `k` (from 1) of generation `G` is the `k`-th committed frame of the wallog that
//! is `G`; numbering is dense, and since every log opens with a full image, frames 1.. of any
//! generation bring a client from anywhere to the server's state. Clients get SQLite's WAL
//! frame layout: a 24-byte header with the page number (big-endian, bytes 0..4) and the
//! commit size (bytes 4..8, non-zero on a transaction's last frame), salts and checksums
//! zero, then the page.

use std::os::unix::fs::FileExt;

use super::format::FRAME_SIZE;
use super::logger::frame_offset;
use super::{LogError, ReplicationLogger, WALLOG};

/// What a pull gets.
#[derive(Debug)]
pub enum Pull {
    /// Whole frames, SQLite WAL layout, at least one.
    Frames(Vec<u8>),
    /// Nothing to serve for that generation from there on: the client is at its end, or the
    /// generation is superseded and the client has nothing of it (or it is no longer kept).
    EndOfGeneration { current: u64 },
}

/// Frames `start..end` (1-based, end exclusive, `start < end`) of `generation`, at most what
/// the log has committed.
///
/// A generation compaction superseded lately is still served to a client part-way through it
/// (`start > 1`), up to its end, which is a transaction's end: told of the next generation
/// inside a transaction, real clients fail the sync or abort the process. A client that has
/// nothing of it (`start == 1`) or all of it is told of the next at once.
pub fn pull(logger: &ReplicationLogger, generation: u64, start: u64, end: u64) -> Result<Pull, LogError> {
    let (current, file, header) = logger.sync_view();
    let (file, committed) = match generation {
        _ if start == 0 => return Ok(Pull::EndOfGeneration { current }),
        g if g == current => (file, header.frame_count),
        g if g < current && start > 1 => match logger.superseded(g) {
            Some(old) => old,
            None => return Ok(Pull::EndOfGeneration { current }),
        },
        _ => return Ok(Pull::EndOfGeneration { current }),
    };
    if start > committed {
        return Ok(Pull::EndOfGeneration { current });
    }
    let last = (end - 1).min(committed);
    let count = (last - start + 1) as usize;
    let mut frames = vec![0u8; count * FRAME_SIZE];
    let path = logger.dir().join(WALLOG);
    file.read_exact_at(&mut frames, frame_offset(start - 1)).map_err(|e| LogError::io(&path, e))?;
    for frame in frames.chunks_exact_mut(FRAME_SIZE) {
        let page_no = u32::from_le_bytes(frame[16..20].try_into().unwrap());
        let size_after = u32::from_le_bytes(frame[20..24].try_into().unwrap());
        frame[..24].fill(0);
        frame[0..4].copy_from_slice(&page_no.to_be_bytes());
        frame[4..8].copy_from_slice(&size_after.to_be_bytes());
    }
    Ok(Pull::Frames(frames))
}
