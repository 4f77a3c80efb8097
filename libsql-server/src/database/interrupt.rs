//! Stopping a statement that must not go on: past its time limit, past its transaction's
//! limit while it holds the write lock, when its client went away, or when the server shuts
//! down. SQLite calls a progress handler every few thousand virtual-machine steps; the
//! handler checks these conditions and, when one holds, SQLite stops the statement with
//! `SQLITE_INTERRUPT`. The reason is kept so the error says which limit was hit.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Virtual-machine steps between two checks: a check costs a clock read, a step a few
/// nanoseconds, so this is well under a millisecond of work.
pub const CHECK_EVERY_OPS: i32 = 4000;

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
    /// The client of the request running on this connection went away.
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
            cancelled: AtomicBool::new(false),
            statement_deadline: AtomicU64::new(0),
            statement_limit_ms: AtomicU64::new(0),
            transaction_deadline: AtomicU64::new(0),
            transaction_limit_ms: AtomicU64::new(0),
        }
    }

    /// A statement starts: it may run for `limit` (`None`: as long as it takes).
    pub fn start_statement(&self, limit: Option<Duration>) {
        set_deadline(&self.statement_deadline, &self.statement_limit_ms, limit);
    }

    /// The connection took the write lock: its transaction may hold it for `limit`.
    pub fn start_transaction(&self, limit: Option<Duration>) {
        set_deadline(&self.transaction_deadline, &self.transaction_limit_ms, limit);
    }

    pub fn end_transaction(&self) {
        self.transaction_deadline.store(0, Ordering::Relaxed);
    }

    /// True once the write transaction held past its limit (checked by the stream reaper
    /// for transactions left idle).
    pub fn transaction_expired(&self) -> bool {
        let deadline = self.transaction_deadline.load(Ordering::Relaxed);
        deadline != 0 && now_ms() >= deadline
    }

    /// The client of the current request is gone: stop what runs for it.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// A new request uses the connection, or it goes back to the pool: no earlier request's
    /// cancellation or statement deadline applies any more.
    pub fn rearm(&self) {
        self.cancelled.store(false, Ordering::Relaxed);
        self.statement_deadline.store(0, Ordering::Relaxed);
    }

    /// The reason to stop now, if any.
    pub fn reason(&self) -> Option<Reason> {
        if self.halt.load(Ordering::Relaxed) {
            return Some(Reason::ShuttingDown);
        }
        if self.cancelled.load(Ordering::Relaxed) {
            return Some(Reason::ClientGone);
        }
        let now = now_ms();
        let txn = self.transaction_deadline.load(Ordering::Relaxed);
        if txn != 0 && now >= txn {
            return Some(Reason::TransactionTimeout(Duration::from_millis(self.transaction_limit_ms.load(Ordering::Relaxed))));
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
/// opened on the blocking thread itself); a drop before the attach still cancels it.
pub struct CancelOnDrop {
    target: Arc<CancelTarget>,
    armed: bool,
}

#[derive(Default)]
pub struct CancelTarget {
    gone: AtomicBool,
    interrupt: OnceLock<Arc<Interrupt>>,
}

impl CancelTarget {
    /// The connection the request runs on; attached once.
    pub fn attach(&self, interrupt: &Arc<Interrupt>) {
        interrupt.rearm();
        if self.interrupt.set(interrupt.clone()).is_ok() && self.gone.load(Ordering::SeqCst) {
            interrupt.cancel();
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
            if let Some(interrupt) = self.target.interrupt.get() {
                interrupt.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_in_order() {
        let halt = Arc::new(AtomicBool::new(false));
        let i = Interrupt::new(halt.clone());
        assert_eq!(i.reason(), None);
        i.start_statement(Some(Duration::ZERO));
        assert_eq!(i.reason(), Some(Reason::StatementTimeout(Duration::ZERO)));
        i.start_statement(Some(Duration::from_secs(60)));
        assert_eq!(i.reason(), None);
        i.start_statement(None);
        assert_eq!(i.reason(), None);
        i.start_transaction(Some(Duration::ZERO));
        assert!(i.transaction_expired());
        assert_eq!(i.reason(), Some(Reason::TransactionTimeout(Duration::ZERO)));
        i.end_transaction();
        assert_eq!(i.reason(), None);
        // The request's future is dropped before and after its connection is attached.
        let early = CancelOnDrop::new();
        let target = early.target();
        drop(early);
        let shared = Arc::new(Interrupt::new(halt.clone()));
        target.attach(&shared);
        assert_eq!(shared.reason(), Some(Reason::ClientGone));
        shared.rearm();
        let late = CancelOnDrop::new();
        late.target().attach(&shared);
        assert_eq!(shared.reason(), None);
        drop(late);
        assert_eq!(shared.reason(), Some(Reason::ClientGone));
        let done = CancelOnDrop::new();
        let other = Arc::new(Interrupt::new(halt.clone()));
        done.target().attach(&other);
        done.disarm();
        assert_eq!(other.reason(), None);
        halt.store(true, Ordering::Relaxed);
        assert_eq!(shared.reason(), Some(Reason::ShuttingDown));
    }
}
