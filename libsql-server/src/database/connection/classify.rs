//! Where a replica runs a statement: [`Connection::classify`] splits a SQL text into its
//! statements and says of each whether the replica's copy can run it, preparing (never
//! stepping) each on this connection so the authorizer sees it.

use std::sync::atomic::Ordering;

use libsql_sys::rusqlite;

use super::{begins_write_transaction, Connection};

/// Most statements [`Connection::classify`] splits one text into.
const MAX_CLASSIFIED: usize = 4096;

/// Bytes `sqlite3_complete` may scan for one [`Connection::classify`] call (each statement the
/// copy cannot prepare is tried at each `;` in turn).
const COMPLETE_SCAN_BUDGET: usize = 64 << 20;

/// Where the statement at `start` of the NUL-terminated `text` ends, by `sqlite3_complete`
/// (which knows strings, comments and trigger bodies without the schema): just past the
/// first `;` that completes it; the end of the text if none does, or `budget` (bytes
/// scanned) runs out.
fn complete_end(text: &mut [u8], start: usize, budget: &mut usize) -> usize {
    let end = text.len() - 1;
    let mut at = start;
    while let Some(offset) = text[at..end].iter().position(|b| *b == b';') {
        let semicolon = at + offset;
        let scanned = semicolon + 1 - start;
        if scanned > *budget {
            break;
        }
        *budget -= scanned;
        // Cut the text after this `;` for the check, then put the byte back.
        let kept = std::mem::replace(&mut text[semicolon + 1], 0);
        // SAFETY: `text[start..]` is NUL-terminated at `semicolon + 1` for the call.
        let complete = unsafe { rusqlite::ffi::sqlite3_complete(text[start..].as_ptr().cast()) } != 0;
        text[semicolon + 1] = kept;
        if complete {
            return semicolon + 1;
        }
        at = semicolon + 1;
    }
    end
}

impl Connection {
    /// The statements of `sql`, each with its text and whether a replica's copy can run it:
    /// a read that neither needs the write gate, controls a transaction, nor changes the
    /// connection's state (a flag PRAGMA takes effect as it is prepared: the connection is
    /// tainted, and so not pooled). Each is prepared anew (never from the cache), so the
    /// authorizer sees it; nothing is stepped. Where the copy cannot prepare a statement (a
    /// table it does not have yet), SQLite's `sqlite3_complete` finds where it ends. Past
    /// [`MAX_CLASSIFIED`] statements, or once the client left, the rest is one text, for the
    /// primary to judge. Linear in the text (parsed in place, NUL-terminated).
    pub fn classify(&mut self, sql: &str) -> Vec<(String, bool)> {
        use rusqlite::ffi;
        let mut text = Vec::with_capacity(sql.len() + 1);
        text.extend_from_slice(sql.as_bytes());
        text.push(0);
        let mut classified = Vec::new();
        let mut start = 0;
        let mut complete_budget = COMPLETE_SCAN_BUDGET;
        while !sql[start..].trim().is_empty() {
            if classified.len() >= MAX_CLASSIFIED || self.access.interrupt.abandoned() {
                classified.push((sql[start..].to_owned(), false));
                break;
            }
            self.access.clear_mark();
            let policy = &self.access.policy;
            policy.transaction_control.store(false, Ordering::Relaxed);
            let tainted = policy.tainted.load(Ordering::Relaxed);
            let mut stmt = std::ptr::null_mut();
            let mut tail = std::ptr::null();
            let rest = text[start..].as_ptr();
            // SAFETY: the handle is this open connection's, used on its thread; `text` is
            // NUL-terminated and outlives the call; `tail` points into it.
            let rc = unsafe { ffi::sqlite3_prepare_v2(self.conn.handle(), rest.cast(), -1, &mut stmt, &mut tail) };
            let parsed = if tail.is_null() { 0 } else { (tail as usize).saturating_sub(rest as usize).min(sql.len() - start) };
            // SAFETY: `stmt` is null or the statement just prepared, finalized once here.
            let read_only = !stmt.is_null() && unsafe { ffi::sqlite3_stmt_readonly(stmt) } != 0;
            let empty = stmt.is_null();
            unsafe { ffi::sqlite3_finalize(stmt) };
            let end = match rc {
                ffi::SQLITE_OK => start + parsed,
                _ => complete_end(&mut text, start, &mut complete_budget),
            };
            if end <= start || !sql.is_char_boundary(end) {
                classified.push((sql[start..].to_owned(), false));
                break;
            }
            let piece = &sql[start..end];
            start = end;
            if rc == ffi::SQLITE_OK && empty {
                continue; // only a comment or whitespace
            }
            let marked = policy.wants_gate.load(Ordering::Relaxed);
            let control = policy.transaction_control.load(Ordering::Relaxed);
            let taints = tainted || policy.tainted.load(Ordering::Relaxed);
            let local = rc == ffi::SQLITE_OK && read_only && !marked && !control && !taints && !begins_write_transaction(piece);
            classified.push((piece.to_owned(), local));
        }
        self.access.clear_mark();
        classified
    }
}
