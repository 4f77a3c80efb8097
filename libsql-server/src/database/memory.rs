//! Memory one client statement may take from SQLite's allocator.
//!
//! SQLite bounds each value (`SQLITE_LIMIT_LENGTH`) but not a statement: a row of two
//! thousand 16 MiB columns is 32 GiB, and its heap limits are process-wide, so setting one
//! would fail every tenant's statements for one tenant's query. The server therefore wraps
//! SQLite's allocator (once, before SQLite starts): while a client statement runs on a
//! thread, the bytes SQLite allocates there, net of those it frees, are charged to that
//! statement's [`Meter`], and an allocation that would take it past its limit fails. SQLite
//! then ends the statement with `SQLITE_NOMEM`, which the connection reports as this limit.
//!
//! The server's own work (checkpoints, the replication log, closing connections) is never
//! charged, and memory a statement leaves behind (its connection's page cache, bounded by
//! `cache_size`) is not charged to the next one.

use std::cell::RefCell;
use std::ffi::{c_int, c_void};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use libsql_sys::rusqlite::ffi;

/// What one connection's running client statement has taken.
#[derive(Default)]
pub struct Meter {
    /// Bytes allocated minus bytes freed since the statement started (below zero when it
    /// frees memory allocated before it).
    used: AtomicI64,
    /// The most `used` may reach; 0: no limit.
    limit: AtomicI64,
    /// A client statement runs: its allocations are charged.
    active: AtomicBool,
    /// An allocation was refused since the statement started.
    exceeded: AtomicBool,
}

thread_local! {
    /// The meter of the client statement running on this thread, if any.
    static CURRENT: RefCell<Option<Arc<Meter>>> = const { RefCell::new(None) };
}

impl Meter {
    /// A client statement starts on this thread: it may take `limit` bytes (`None`: no limit).
    pub fn enter(self: &Arc<Self>, limit: Option<u64>) {
        self.used.store(0, Ordering::Relaxed);
        self.exceeded.store(false, Ordering::Relaxed);
        self.limit.store(limit.map_or(0, |l| i64::try_from(l).unwrap_or(i64::MAX)), Ordering::Relaxed);
        self.active.store(true, Ordering::Relaxed);
        let _ = CURRENT.try_with(|current| *current.borrow_mut() = Some(self.clone()));
    }

    /// The client statement ended: nothing more is charged.
    pub fn leave(&self) {
        self.active.store(false, Ordering::Relaxed);
        let _ = CURRENT.try_with(|current| current.borrow_mut().take());
    }

    /// Whether an allocation was refused since the statement started.
    pub fn exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Relaxed)
    }

    /// Charges `bytes` (negative: given back); false, and nothing charged, when the charge
    /// would take the statement past its limit.
    fn charge(&self, bytes: i64) -> bool {
        let used = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let limit = self.limit.load(Ordering::Relaxed);
        if bytes > 0 && limit > 0 && used > limit {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            self.exceeded.store(true, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Records `bytes` already taken or given back, whatever the limit.
    fn settle(&self, bytes: i64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Runs `f` with the meter of the client statement running on this thread, if any.
fn with_meter<T>(f: impl FnOnce(&Meter) -> T) -> Option<T> {
    CURRENT
        .try_with(|current| {
            let current = current.try_borrow().ok()?;
            let meter = current.as_ref()?;
            meter.active.load(Ordering::Relaxed).then(|| f(meter))
        })
        .ok()
        .flatten()
}

/// SQLite's own allocator, which the wrapper calls.
struct Inner {
    malloc: unsafe extern "C" fn(c_int) -> *mut c_void,
    free: unsafe extern "C" fn(*mut c_void),
    realloc: unsafe extern "C" fn(*mut c_void, c_int) -> *mut c_void,
    size: unsafe extern "C" fn(*mut c_void) -> c_int,
}

static INNER: OnceLock<Inner> = OnceLock::new();
/// Whether the wrapper is in place.
static INSTALLED: OnceLock<bool> = OnceLock::new();

/// Wraps SQLite's allocator so statements can be metered. Must run before SQLite starts
/// (before the first connection of the process); later calls return the first one's answer.
pub fn install() -> bool {
    *INSTALLED.get_or_init(|| {
        // SAFETY: configuration calls with the argument types SQLite documents for them;
        // both copy the structure they are given.
        unsafe {
            let mut inner: ffi::sqlite3_mem_methods = std::mem::zeroed();
            if ffi::sqlite3_config(ffi::SQLITE_CONFIG_GETMALLOC, &mut inner as *mut ffi::sqlite3_mem_methods) != ffi::SQLITE_OK {
                return false;
            }
            let (Some(malloc), Some(free), Some(realloc), Some(size)) = (inner.xMalloc, inner.xFree, inner.xRealloc, inner.xSize) else {
                return false;
            };
            let _ = INNER.set(Inner { malloc, free, realloc, size });
            let metered = ffi::sqlite3_mem_methods {
                xMalloc: Some(metered_malloc),
                xFree: Some(metered_free),
                xRealloc: Some(metered_realloc),
                ..inner
            };
            let rc = ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &metered as *const ffi::sqlite3_mem_methods);
            if rc != ffi::SQLITE_OK {
                tracing::warn!(rc, "SQLite started before its allocator could be wrapped: statements' memory is not bounded");
            }
            rc == ffi::SQLITE_OK
        }
    })
}

fn inner() -> &'static Inner {
    INNER.get().expect("the wrapper is installed only after INNER is set")
}

fn size_of(p: *mut c_void) -> i64 {
    if p.is_null() {
        return 0;
    }
    // SAFETY: `p` came from the inner allocator, which knows its size.
    i64::from(unsafe { (inner().size)(p) })
}

unsafe extern "C" fn metered_malloc(n: c_int) -> *mut c_void {
    let p = (inner().malloc)(n);
    if !p.is_null() && with_meter(|m| m.charge(size_of(p))) == Some(false) {
        (inner().free)(p);
        return std::ptr::null_mut();
    }
    p
}

unsafe extern "C" fn metered_free(p: *mut c_void) {
    if !p.is_null() {
        with_meter(|m| m.settle(-size_of(p)));
    }
    (inner().free)(p)
}

unsafe extern "C" fn metered_realloc(p: *mut c_void, n: c_int) -> *mut c_void {
    let before = size_of(p);
    // Charged before growing: a refused growth leaves the old block as it was, as SQLite
    // expects of a failed realloc.
    let grow = (i64::from(n) - before).max(0);
    if grow > 0 && with_meter(|m| m.charge(grow)) == Some(false) {
        return std::ptr::null_mut();
    }
    let q = (inner().realloc)(p, n);
    let settled = if q.is_null() { -grow } else { size_of(q) - before - grow };
    with_meter(|m| m.settle(settled));
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_stop_at_the_limit_and_only_while_active() {
        let meter = Arc::new(Meter::default());
        meter.enter(Some(100));
        assert!(meter.charge(60));
        assert!(!meter.charge(60), "past the limit");
        assert!(meter.exceeded());
        meter.settle(-50);
        assert!(meter.charge(60), "freed memory makes room again");
        assert_eq!(with_meter(|m| m.used.load(Ordering::Relaxed)), Some(70));
        meter.leave();
        assert_eq!(with_meter(|_| ()), None, "nothing is charged between statements");
        meter.enter(None);
        assert!(!meter.exceeded(), "each statement starts afresh");
        assert!(meter.charge(i64::MAX / 2));
        meter.leave();
    }
}
