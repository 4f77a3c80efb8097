//! Stopping a client statement that must not go on: past its time limit, past its
//! transaction's limit while it holds the write lock, when its client went away, or when the
//! server shuts down. SQLite calls a progress handler every few thousand virtual-machine
//! steps; the handler checks these conditions and, when one holds, SQLite stops the statement
//! with `SQLITE_INTERRUPT`. The reason is kept so the error says which limit was hit.
//!
//! The conditions apply only while a client statement runs: the server's own statements on
//! the same connection (a checkpoint, a close) are never stopped, and a cancellation meant
//! for an earlier request never reaches a later user of a pooled connection (each use has its
//! own epoch). A single function call runs between two checks: the engine's functions that
//! could run long on crafted input are replaced by bounded ones (`functions`) or refused
//! (`policy`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Virtual-machine steps between two checks. A check costs a clock read; a step a few
/// nanoseconds, or, for one over a value of `SQLITE_LIMIT_LENGTH` bytes (`hex`, `upper`),
/// milliseconds, so a statement stops within seconds of its limit.
pub const CHECK_EVERY_OPS: i32 = 1000;

/// Why a statement was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    StatementTimeout(Duration),
    TransactionTimeout(Duration),
    ClientGone,
    ShuttingDown,
}

/// Milliseconds since the first call: deadlines fit in an atomic.
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// One connection's stop conditions.
pub struct Interrupt {
    /// The server's shutdown flag, shared by every connection of the server.
    halt: Arc<AtomicBool>,
    /// A client statement is running (admitted and not yet finished).
    client_running: AtomicBool,
    /// Bumped by every new use of the connection; a cancellation names the use it is for.
    epoch: AtomicU64,
    /// The client of the current use went away.
    cancelled: AtomicBool,
    /// When the running statement must stop (0: no limit), and its limit.
    statement_deadline: AtomicU64,
    statement_limit_ms: AtomicU64,
    /// When the write transaction this connection holds must end (0: none), and its limit.
    transaction_deadline: AtomicU64,
    transaction_limit_ms: AtomicU64,
}

impl Interrupt {
    pub fn new(halt: Arc<AtomicBool>) -> Self {
        Interrupt {
            halt,
            client_running: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            cancelled: AtomicBool::new(false),
            statement_deadline: AtomicU64::new(0),
            statement_limit_ms: AtomicU64::new(0),
            transaction_deadline: AtomicU64::new(0),
            transaction_limit_ms: AtomicU64::new(0),
        }
    }

    /// A client statement starts: it may run for `limit` (`None`: as long as it takes).
    pub fn start_statement(&self, limit: Option<Duration>) {
        set_deadline(&self.statement_deadline, &self.statement_limit_ms, limit);
        self.client_running.store(true, Ordering::Relaxed);
    }

    /// The client statement ended: nothing stops the server's own statements.
    pub fn end_statement(&self) {
        self.client_running.store(false, Ordering::Relaxed);
    }

    /// The connection took the write lock: its transaction may hold it for `limit`.
    pub fn start_transaction(&self, limit: Option<Duration>) {
        set_deadline(&self.transaction_deadline, &self.transaction_limit_ms, limit);
    }

    pub fn end_transaction(&self) {
        self.transaction_deadline.store(0, Ordering::Relaxed);
    }

    /// True once the write transaction held past its limit.
    pub fn transaction_expired(&self) -> bool {
        let deadline = self.transaction_deadline.load(Ordering::Relaxed);
        deadline != 0 && now_ms() >= deadline
    }

    pub fn transaction_limit(&self) -> Duration {
        Duration::from_millis(self.transaction_limit_ms.load(Ordering::Relaxed))
    }

    /// A new use of the connection (a request, or its return to the pool): earlier
    /// cancellations are void. Returns the new use's epoch.
    pub fn rearm(&self) -> u64 {
        self.cancelled.store(false, Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The client of use `epoch` went away: stop what runs for it, if it is still the use.
    fn cancel(&self, epoch: u64) {
        if self.epoch.load(Ordering::SeqCst) == epoch {
            self.cancelled.store(true, Ordering::SeqCst);
        }
    }

    /// Whether the current use's client went away, or the server is stopping: for work done
    /// on its behalf outside a statement (a call to a replica's primary).
    pub fn abandoned(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed) || self.halt.load(Ordering::Relaxed)
    }

    /// The reason to stop the running client statement now, if any.
    pub fn reason(&self) -> Option<Reason> {
        if !self.client_running.load(Ordering::Relaxed) {
            return None;
        }
        if self.halt.load(Ordering::Relaxed) {
            return Some(Reason::ShuttingDown);
        }
        if self.cancelled.load(Ordering::Relaxed) {
            return Some(Reason::ClientGone);
        }
        let now = now_ms();
        let txn = self.transaction_deadline.load(Ordering::Relaxed);
        if txn != 0 && now >= txn {
            return Some(Reason::TransactionTimeout(self.transaction_limit()));
        }
        let stmt = self.statement_deadline.load(Ordering::Relaxed);
        if stmt != 0 && now >= stmt {
            return Some(Reason::StatementTimeout(Duration::from_millis(self.statement_limit_ms.load(Ordering::Relaxed))));
        }
        None
    }
}

fn set_deadline(deadline: &AtomicU64, limit_ms: &AtomicU64, limit: Option<Duration>) {
    match limit {
        Some(limit) => {
            let ms = limit.as_millis() as u64;
            limit_ms.store(ms, Ordering::Relaxed);
            deadline.store(now_ms().saturating_add(ms), Ordering::Relaxed);
        }
        None => deadline.store(0, Ordering::Relaxed),
    }
}

/// Stops the blocking work of a request whose future is dropped (its client went away)
/// unless disarmed first. The connection may be attached after the guard exists (it is often
/// opened on the blocking thread itself); a drop before the attach still cancels it, and a
/// drop after the connection went on to another use does nothing.
pub struct CancelOnDrop {
    target: Arc<CancelTarget>,
    armed: bool,
}

#[derive(Default)]
pub struct CancelTarget {
    gone: AtomicBool,
    attached: Mutex<Option<(Arc<Interrupt>, u64)>>,
}

impl CancelTarget {
    /// The connection this request runs on, as a new use of it.
    pub fn attach(&self, interrupt: &Arc<Interrupt>) {
        let epoch = interrupt.rearm();
        *self.attached.lock().unwrap_or_else(|e| e.into_inner()) = Some((interrupt.clone(), epoch));
        if self.gone.load(Ordering::SeqCst) {
            interrupt.cancel(epoch);
        }
    }
}

impl CancelOnDrop {
    pub fn new() -> Self {
        CancelOnDrop { target: Arc::default(), armed: true }
    }

    pub fn target(&self) -> Arc<CancelTarget> {
        self.target.clone()
    }

    pub fn disarm(mut self) {
        self.armed = false;
    }
}

impl Default for CancelOnDrop {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if self.armed {
            self.target.gone.store(true, Ordering::SeqCst);
            if let Some((interrupt, epoch)) = self.target.attached.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                interrupt.cancel(*epoch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_apply_only_to_a_running_client_statement() {
        let halt = Arc::new(AtomicBool::new(false));
        let i = Interrupt::new(halt.clone());
        i.start_statement(Some(Duration::ZERO));
        assert_eq!(i.reason(), Some(Reason::StatementTimeout(Duration::ZERO)));
        i.end_statement();
        assert_eq!(i.reason(), None, "the server's own statements are never stopped");
        i.start_statement(Some(Duration::from_secs(60)));
        assert_eq!(i.reason(), None);
        i.start_statement(None);
        assert_eq!(i.reason(), None);
        i.start_transaction(Some(Duration::ZERO));
        assert!(i.transaction_expired());
        assert_eq!(i.reason(), Some(Reason::TransactionTimeout(Duration::ZERO)));
        i.end_transaction();
        assert_eq!(i.reason(), None);
        halt.store(true, Ordering::Relaxed);
        assert_eq!(i.reason(), Some(Reason::ShuttingDown));
        i.end_statement();
        assert_eq!(i.reason(), None);
    }

    #[test]
    fn a_vanished_client_stops_its_own_use_only() {
        let halt = Arc::new(AtomicBool::new(false));
        // Dropped before the connection is attached.
        let early = CancelOnDrop::new();
        let target = early.target();
        drop(early);
        let shared = Arc::new(Interrupt::new(halt.clone()));
        target.attach(&shared);
        shared.start_statement(None);
        assert_eq!(shared.reason(), Some(Reason::ClientGone));
        // Dropped while its use runs.
        let late = CancelOnDrop::new();
        late.target().attach(&shared);
        assert_eq!(shared.reason(), None);
        drop(late);
        assert_eq!(shared.reason(), Some(Reason::ClientGone));
        // Dropped after the connection went on to another use: that use is not touched.
        let stale = CancelOnDrop::new();
        stale.target().attach(&shared);
        shared.rearm();
        drop(stale);
        assert_eq!(shared.reason(), None);
        // Disarmed: nothing.
        let done = CancelOnDrop::new();
        done.target().attach(&shared);
        done.disarm();
        assert_eq!(shared.reason(), None);
    }
}
