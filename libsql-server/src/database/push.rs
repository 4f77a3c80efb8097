//! Applying frames pushed by a sync client (its offline writes) through this database's own
//! write path, so they enter the replication log like any other write.
//!
//! The push is checked before anything is applied: whole 4096-byte pages, every transaction
//! ends with a commit frame, and the database it would produce passes SQLite's quick check
//! (built in a scratch copy). Each of the client's transactions is then committed as one
//! transaction here, frame for frame, so the log's frame numbers stay those of the client.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use libsql_sys::ffi;
use libsql_sys::rusqlite::{self, OpenFlags};

use super::{Database, PAGE_SIZE};
use crate::replication::format::FRAME_HEADER_SIZE;

const FRAME: usize = FRAME_HEADER_SIZE + PAGE_SIZE;

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("malformed frames: {0}")]
    Malformed(String),
    #[error("the pushed frames would corrupt the database: {0}")]
    FailsQuickCheck(String),
    #[error("the write lock stayed busy; retry the push")]
    Busy,
    #[error("writes are blocked on this namespace{}", .0.as_ref().map(|r| format!(": {r}")).unwrap_or_default())]
    Blocked(Option<String>),
    #[error("the pushed database ({pages} pages) is larger than the namespace allows ({max} pages)")]
    TooLarge { pages: u64, max: u64 },
    #[error("applying the frames failed: {0}")]
    Apply(String),
}

/// Where the server's log stands, as a push sees it.
#[derive(Debug, Clone, Copy)]
pub struct PushTarget {
    pub generation: u64,
    /// The last frame of the generation (frames are numbered from 1).
    pub max_frame_no: u64,
}

#[derive(Debug)]
pub enum PushOutcome {
    Applied(PushTarget),
    /// The push does not continue from the server's last frame, or names another generation.
    Conflict(PushTarget),
}

/// Largest database a push may describe when the namespace sets no limit (pages): 256 GiB.
const MAX_PUSH_PAGES: u64 = 1 << 26;

/// Checks the shape of a push body: whole frames, page numbers from 1 up to the commit size
/// of their transaction, and a commit frame ending the last transaction.
pub fn check_frames(body: &[u8]) -> Result<usize, PushError> {
    if body.is_empty() || !body.len().is_multiple_of(FRAME) {
        return Err(PushError::Malformed(format!(
            "{} bytes is not a whole number of {FRAME}-byte frames (page size {PAGE_SIZE})",
            body.len()
        )));
    }
    let mut open = false;
    for (i, frame) in body.chunks_exact(FRAME).enumerate() {
        let page_no = u32::from_be_bytes(frame[0..4].try_into().unwrap());
        let commit = u32::from_be_bytes(frame[4..8].try_into().unwrap());
        if page_no == 0 {
            return Err(PushError::Malformed(format!("frame {i} has page number 0")));
        }
        if page_no == 1 && u16::from_be_bytes([frame[FRAME_HEADER_SIZE + 16], frame[FRAME_HEADER_SIZE + 17]]) as usize != PAGE_SIZE {
            return Err(PushError::Malformed(format!("the database page size is not {PAGE_SIZE}")));
        }
        open = commit == 0;
    }
    if open {
        return Err(PushError::Malformed("the last transaction has no commit frame".into()));
    }
    // Every page must lie inside the database its transaction commits.
    let mut txn_start = 0;
    for (i, frame) in body.chunks_exact(FRAME).enumerate() {
        let commit = u32::from_be_bytes(frame[4..8].try_into().unwrap());
        if commit == 0 {
            continue;
        }
        if commit as u64 > MAX_PUSH_PAGES {
            return Err(PushError::TooLarge { pages: commit as u64, max: MAX_PUSH_PAGES });
        }
        for (j, f) in body.chunks_exact(FRAME).enumerate().take(i + 1).skip(txn_start) {
            if u32::from_be_bytes(f[0..4].try_into().unwrap()) > commit {
                return Err(PushError::Malformed(format!("frame {j} writes a page past its transaction's database size {commit}")));
            }
        }
        txn_start = i + 1;
    }
    Ok(body.len() / FRAME)
}

/// Checks that every transaction of a checked push body fully defines the database it
/// commits, starting from a database of `size` pages: a page it adds past the current end
/// must be written (by it or an earlier transaction of the push), and a page 1 it writes must
/// name its commit size in its header. Otherwise the result would hold pages nobody wrote (a
/// file grown with zeros that SQLite later finds malformed).
fn check_defined(body: &[u8], mut size: u64) -> Result<(), PushError> {
    let mut written_past_end = std::collections::HashSet::new();
    let mut txn_start = 0;
    for (i, frame) in body.chunks_exact(FRAME).enumerate() {
        let page_no = u32::from_be_bytes(frame[0..4].try_into().unwrap()) as u64;
        let commit = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as u64;
        if page_no > size {
            written_past_end.insert(page_no);
        }
        if commit == 0 {
            continue;
        }
        for f in body.chunks_exact(FRAME).take(i + 1).skip(txn_start) {
            if u32::from_be_bytes(f[0..4].try_into().unwrap()) == 1 {
                let in_header = u32::from_be_bytes(f[FRAME_HEADER_SIZE + 28..FRAME_HEADER_SIZE + 32].try_into().unwrap()) as u64;
                if in_header != commit {
                    return Err(PushError::Malformed(format!("page 1 names a database of {in_header} pages, its transaction commits {commit}")));
                }
            }
        }
        if let Some(missing) = (size + 1..=commit).find(|p| !written_past_end.contains(p)) {
            return Err(PushError::Malformed(format!(
                "a transaction grows the database to {commit} pages but page {missing} is not in the push"
            )));
        }
        size = commit;
        written_past_end.retain(|p| *p <= size);
        txn_start = i + 1;
    }
    Ok(())
}

/// The largest commit size in a checked push body.
fn largest_commit(body: &[u8]) -> u64 {
    body.chunks_exact(FRAME).map(|f| u32::from_be_bytes(f[4..8].try_into().unwrap()) as u64).max().unwrap_or(0)
}

impl Database {
    /// Applies a push that continues generation `generation` from frame `start`. Holds the
    /// write gate throughout, so the check against the log and the apply are one step.
    pub fn apply_push(&self, generation: u64, start: u64, body: &[u8]) -> Result<PushOutcome, PushError> {
        check_frames(body)?;
        let config = self.config();
        if config.block_writes || config.block_reads {
            return Err(PushError::Blocked(config.block_reason.clone()));
        }
        if config.max_db_pages > 0 && largest_commit(body) > config.max_db_pages {
            return Err(PushError::TooLarge { pages: largest_commit(body), max: config.max_db_pages });
        }
        let _permit = self.shared.gate.acquire(self.shared.limits.write_lock_timeout).ok_or(PushError::Busy)?;
        let current = self.push_target()?;
        if generation != current.generation || start != current.max_frame_no + 1 {
            return Ok(PushOutcome::Conflict(current));
        }
        self.quick_check_with(body)?;
        let conn = self.connection().map_err(|e| PushError::Apply(e.to_string()))?;
        // This path holds the gate itself (above), not through the connection's admission.
        conn.set_gate_held(true);
        let applied = insert_frames(conn.sqlite(), body);
        conn.set_gate_held(false);
        self.recycle(conn);
        applied?;
        Ok(PushOutcome::Applied(self.push_target()?))
    }

    pub fn push_target(&self) -> Result<PushTarget, PushError> {
        let (generation, _, header) = self.shared.log().map_err(|e| PushError::Apply(e.to_string()))?.sync_view();
        Ok(PushTarget { generation, max_frame_no: header.frame_count })
    }

    /// Builds the database the push would produce in a scratch file beside the data file and
    /// runs SQLite's quick check on it.
    fn quick_check_with(&self, body: &[u8]) -> Result<(), PushError> {
        let apply = |e: &dyn std::fmt::Display| PushError::Apply(e.to_string());
        let checkpoint = self.checkpoint(super::CheckpointMode::Truncate).map_err(|e| apply(&e))?;
        if checkpoint.0 != 0 {
            return Err(PushError::Busy);
        }
        let scratch = tempfile::Builder::new()
            .prefix(".push-check-")
            .tempdir_in(self.shared.path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| apply(&e))?;
        let copy = scratch.path().join("data");
        let size = std::fs::copy(&self.shared.path, &copy).map_err(|e| apply(&e))?;
        check_defined(body, size / PAGE_SIZE as u64)?;
        let file = OpenOptions::new().write(true).open(&copy).map_err(|e| apply(&e))?;
        for frame in body.chunks_exact(FRAME) {
            let page_no = u32::from_be_bytes(frame[0..4].try_into().unwrap()) as u64;
            let commit = u32::from_be_bytes(frame[4..8].try_into().unwrap()) as u64;
            file.write_all_at(&frame[FRAME_HEADER_SIZE..], (page_no - 1) * PAGE_SIZE as u64).map_err(|e| apply(&e))?;
            if commit != 0 {
                file.set_len(commit * PAGE_SIZE as u64).map_err(|e| apply(&e))?;
            }
        }
        drop(file);
        let conn = rusqlite::Connection::open_with_flags(&copy, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)
            .map_err(|e| apply(&e))?;
        let verdict: Result<String, _> = conn.query_row("PRAGMA quick_check", [], |r| r.get(0));
        match verdict {
            Ok(ok) if ok == "ok" => Ok(()),
            Ok(problem) => Err(PushError::FailsQuickCheck(problem)),
            Err(e) => Err(PushError::FailsQuickCheck(e.to_string())),
        }
    }
}

/// Inserts the frames into SQLite's WAL through libSQL's frame-insertion API: each frame goes
/// through the WAL wrapper like any write, each commit frame ends a transaction. The caller
/// holds the write gate, so no other writer moves the WAL meanwhile.
fn insert_frames(conn: &rusqlite::Connection, body: &[u8]) -> Result<(), PushError> {
    let mut frames = body.chunks_exact(FRAME);
    insert_wal_frames(conn, |buf| Ok(frames.next().map(|frame| buf.copy_from_slice(frame)).is_some())).map_err(PushError::Apply)
}

/// Inserts frames (SQLite's WAL layout: big-endian page number and commit size, then the
/// page) into the WAL of `conn` through libSQL's frame-insertion API, each commit frame
/// ending a transaction. `next` fills the buffer with the next frame, or says there is none.
/// The caller holds the write gate. An unfinished transaction is dropped.
pub(super) fn insert_wal_frames(conn: &rusqlite::Connection, mut next: impl FnMut(&mut [u8]) -> Result<bool, String>) -> Result<(), String> {
    let db = unsafe { conn.handle() };
    let fail = |what: &str, rc: i32| format!("{what}: {}", rusqlite::ffi::Error::new(rc));
    // Frame numbers past the WAL's end append (lower ones would be compared, not written).
    // Counted from the WAL's end before the first insert: a WAL restart only lowers its end.
    let mut wal_end: u32 = 0;
    let rc = unsafe { ffi::libsql_wal_frame_count(db, &mut wal_end) };
    if rc != 0 {
        return Err(fail("reading the WAL frame count", rc));
    }
    let mut in_txn = false;
    let mut result = Ok(());
    let mut buf = vec![0u8; FRAME];
    for i in 0u32.. {
        match next(&mut buf) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        if !in_txn {
            let rc = unsafe { ffi::libsql_wal_insert_begin(db) };
            if rc != 0 {
                result = Err(fail("starting the insert", rc));
                break;
            }
            in_txn = true;
        }
        let commit = u32::from_be_bytes(buf[4..8].try_into().unwrap()) != 0;
        let mut conflict = 0;
        let rc = unsafe { ffi::libsql_wal_insert_frame(db, wal_end + 1 + i, buf.as_mut_ptr().cast(), FRAME as u32, &mut conflict) };
        if rc != 0 {
            result = Err(fail("inserting a frame", rc));
            break;
        }
        if commit {
            let rc = unsafe { ffi::libsql_wal_insert_end(db) };
            in_txn = false;
            if rc != 0 {
                result = Err(fail("committing", rc));
                break;
            }
        }
    }
    if in_txn {
        unsafe { ffi::libsql_wal_insert_end(db) };
    }
    result
}
