//! Capture: the virtual-WAL wrapper on every primary connection that hands each committed
//! transaction to the [`ReplicationLogger`].
//!
//! A large transaction reaches the WAL in several calls (spills) before its commit call, and a
//! savepoint rollback rewinds SQLite's WAL; SQLite also rewrites a page of the running
//! transaction in place. Rather than mirror all that, capture reads the spilled frames back
//! from SQLite's own WAL at the commit call (as SQLite holds them then; this connection holds
//! the WAL write lock, so nothing can checkpoint or overwrite them), adds the commit call's
//! pages, and makes the transaction durable in the log before SQLite commits it, counting it
//! only once SQLite has (see [`ReplicationLogger::stage_commit`]). Rolled-back transactions
//! never reach the log.
//!
//! A replica's connections carry the wrapper without a logger: their copy is written only by
//! the follower (through its own connection), so every write transaction is refused
//! (`SQLITE_READONLY`), whatever path it took.

use std::num::NonZeroU32;
use std::sync::Arc;

use libsql_sys::wal::wrapper::WrapWal;
use libsql_sys::wal::{PageHeaders, Result, UndoHandler, Wal};

use super::format::{FRAME_HEADER_SIZE, PAGE_SIZE};
use super::{failpoint, ReplicationLogger};

/// `SQLITE_IOERR`: what a write gets once the log is broken.
const SQLITE_IOERR: i32 = 10;

/// `SQLITE_READONLY`: what a write on a replica's copy gets.
const SQLITE_READONLY: i32 = 8;

#[derive(Clone)]
pub struct ReplicationWal {
    /// `None` on a replica's copy: no write transaction begins.
    logger: Option<Arc<ReplicationLogger>>,
    /// The WAL frame count just before the running write transaction's first frame, once
    /// the transaction has spilled frames into the WAL before its commit.
    txn_start: Option<u32>,
    /// The spilled frames read back at commit (SQLite WAL frames: 24-byte header, page).
    spilled: Vec<u8>,
}

impl ReplicationWal {
    pub fn new(logger: Option<Arc<ReplicationLogger>>) -> Self {
        ReplicationWal { logger, txn_start: None, spilled: Vec::new() }
    }
}

/// SQLite's WAL frame header holds the page number big-endian in bytes 0..4.
fn wal_page_no(frame: &[u8]) -> u32 {
    u32::from_be_bytes(frame[..4].try_into().unwrap())
}

impl<W: Wal> WrapWal<W> for ReplicationWal {
    fn begin_write_txn(&mut self, wrapped: &mut W) -> Result<()> {
        match &self.logger {
            None => return Err(libsql_sys::wal::Error::new(SQLITE_READONLY)),
            Some(logger) if logger.is_poisoned() => return Err(libsql_sys::wal::Error::new(SQLITE_IOERR)),
            Some(_) => {}
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
        let Some(logger) = self.logger.clone() else {
            return Err(libsql_sys::wal::Error::new(SQLITE_READONLY));
        };
        let before = wrapped.frames_in_wal();
        if !is_commit {
            let written = page_headers.iter().count() as u32;
            let result = wrapped.insert_frames(page_size, page_headers, size_after, false, sync_flags)?;
            let after = wrapped.frames_in_wal();
            // SQLite may restart its WAL at frame 1 inside the first call of a transaction.
            self.txn_start.get_or_insert(if after >= before + written { before } else { 0 });
            return Ok(result);
        }

        // The transaction: its frames already spilled into SQLite's WAL (as SQLite holds
        // them now, after in-place rewrites and savepoint rollbacks), then the commit call's
        // pages. A page in both is logged twice, the later version winning on replay: so a
        // pushed transaction is logged with exactly the frames the client sent.
        let frame_len = FRAME_HEADER_SIZE + PAGE_SIZE;
        let spilled_frames = self.txn_start.take().map_or(0, |start| before - start) as usize;
        self.spilled.resize(spilled_frames * frame_len, 0);
        for (i, frame) in self.spilled.chunks_exact_mut(frame_len).enumerate() {
            let frame_no = NonZeroU32::new(before - spilled_frames as u32 + 1 + i as u32).expect("WAL frames are numbered from 1");
            // Nothing is committed yet: the transaction fails and the log stays whole.
            if let Err(e) = wrapped.read_frame_raw(frame_no, frame) {
                tracing::error!(dir = %logger.dir().display(), error = ?e, frame_no, "reading back a spilled WAL frame failed; the transaction does not commit");
                return Err(e);
            }
        }
        let mut pages: Vec<(u32, &[u8])> =
            self.spilled.chunks_exact(frame_len).map(|f| (wal_page_no(f), &f[FRAME_HEADER_SIZE..])).collect();
        pages.extend(page_headers.iter());
        let staged = match logger.stage_commit(&pages, size_after) {
            Ok(staged) => staged,
            Err(e) => {
                tracing::error!(dir = %logger.dir().display(), error = %e, "a transaction could not be logged; it does not commit");
                return Err(libsql_sys::wal::Error::new(SQLITE_IOERR));
            }
        };
        drop(pages);
        let dir = logger.dir();
        staged.commit(|| {
            failpoint::check("wal.commit", dir).map_err(|_| libsql_sys::wal::Error::new(SQLITE_IOERR))?;
            wrapped.insert_frames(page_size, page_headers, size_after, true, sync_flags)
        })
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
