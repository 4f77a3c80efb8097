//! Capture: the virtual-WAL wrapper on every primary connection that hands each committed
//! transaction to the [`ReplicationLogger`].
//!
//! A large transaction reaches the WAL in several calls (spills) before its commit call, and a
//! savepoint rollback rewinds SQLite's WAL; SQLite also rewrites a page of the running
//! transaction in place. Rather than mirror all that, capture reads the transaction's frames
//! back from SQLite's own WAL at commit, exactly as SQLite committed them, while this
//! connection still holds the WAL write lock (nothing can checkpoint or overwrite them yet).
//! Rolled-back transactions never reach the log.

use std::num::NonZeroU32;
use std::sync::Arc;

use libsql_sys::wal::wrapper::WrapWal;
use libsql_sys::wal::{PageHeaders, Result, UndoHandler, Wal};

use super::format::{FRAME_HEADER_SIZE, PAGE_SIZE};
use super::ReplicationLogger;

/// `SQLITE_IOERR`: what a write gets once the log is broken.
const SQLITE_IOERR: i32 = 10;

#[derive(Clone)]
pub struct ReplicationWal {
    logger: Arc<ReplicationLogger>,
    /// The WAL frame count just before the running write transaction's first frame.
    txn_start: Option<u32>,
    buf: Vec<u8>,
}

impl ReplicationWal {
    pub fn new(logger: Arc<ReplicationLogger>) -> Self {
        ReplicationWal { logger, txn_start: None, buf: Vec::new() }
    }

    /// Logs the committed transaction in WAL frames `start+1 ..= end`.
    fn capture<W: Wal>(&mut self, wrapped: &mut W, start: u32, end: u32, size_after: u32) {
        let frame_len = FRAME_HEADER_SIZE + PAGE_SIZE;
        let count = (end - start) as usize;
        self.buf.resize(count * frame_len, 0);
        for (i, frame) in self.buf.chunks_exact_mut(frame_len).enumerate() {
            let frame_no = NonZeroU32::new(start + 1 + i as u32).expect("frames are numbered from 1");
            if let Err(e) = wrapped.read_frame_raw(frame_no, frame) {
                let why = format!("reading back WAL frame {frame_no} of a committed transaction: {e:?}");
                self.logger.poison(why);
                return;
            }
        }
        // SQLite's WAL frame header: page number big-endian in bytes 0..4.
        let mut pages: Vec<(u32, &[u8])> = self
            .buf
            .chunks_exact(frame_len)
            .map(|f| (u32::from_be_bytes(f[..4].try_into().unwrap()), &f[FRAME_HEADER_SIZE..]))
            .collect();
        // A page appears once per transaction; keep only its last version should it not.
        let mut seen = std::collections::HashSet::with_capacity(pages.len());
        pages.reverse();
        pages.retain(|(page_no, _)| seen.insert(*page_no));
        pages.reverse();
        // The log already recorded why it failed and refuses further writes.
        let _ = self.logger.append(&pages, size_after);
    }
}

impl<W: Wal> WrapWal<W> for ReplicationWal {
    fn begin_write_txn(&mut self, wrapped: &mut W) -> Result<()> {
        if self.logger.is_poisoned() {
            return Err(libsql_sys::wal::Error::new(SQLITE_IOERR));
        }
        self.txn_start = None;
        wrapped.begin_write_txn()
    }

    fn insert_frames(
        &mut self,
        wrapped: &mut W,
        page_size: std::ffi::c_int,
        page_headers: &mut PageHeaders,
        size_after: u32,
        is_commit: bool,
        sync_flags: std::ffi::c_int,
    ) -> Result<usize> {
        let before = wrapped.frames_in_wal();
        let written = page_headers.iter().count() as u32;
        let result = wrapped.insert_frames(page_size, page_headers, size_after, is_commit, sync_flags)?;
        let after = wrapped.frames_in_wal();
        // SQLite may restart its WAL at frame 1 inside the first call of a transaction.
        let start = *self.txn_start.get_or_insert(if after >= before + written { before } else { 0 });
        if is_commit {
            self.txn_start = None;
            self.capture(wrapped, start, after, size_after);
        }
        Ok(result)
    }

    fn undo<U: UndoHandler>(&mut self, wrapped: &mut W, handler: Option<&mut U>) -> Result<()> {
        self.txn_start = None;
        wrapped.undo(handler)
    }

    fn end_write_txn(&mut self, wrapped: &mut W) -> Result<()> {
        self.txn_start = None;
        wrapped.end_write_txn()
    }
}
