//! The per-namespace write lock.
//!
//! SQLite allows one writer at a time and answers a second one with `SQLITE_BUSY`. Instead,
//! every connection of a namespace takes this gate before its first write statement and keeps
//! it until the connection is back in autocommit mode (the transaction ended), so concurrent
//! writers wait for each other for a bounded time. Readers never take it: in WAL mode they
//! read a snapshot while a writer works. Repair of the replication log takes the same gate, so
//! it never races a writer.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct WriteGate {
    held: Mutex<bool>,
    freed: Condvar,
}

/// Proof of holding the gate; dropping it lets the next writer in.
pub struct WritePermit {
    gate: Arc<WriteGate>,
}

impl WriteGate {
    /// Waits at most `timeout` for the gate. Called on blocking threads only: it parks the
    /// calling thread.
    pub fn acquire(self: &Arc<Self>, timeout: Duration) -> Option<WritePermit> {
        let deadline = Instant::now() + timeout;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            held = self.freed.wait_timeout(held, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        *held = true;
        Some(WritePermit { gate: self.clone() })
    }
}

impl Drop for WritePermit {
    fn drop(&mut self) {
        *self.gate.held.lock().unwrap_or_else(|e| e.into_inner()) = false;
        self.gate.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_waits_for_the_first_then_gets_in() {
        let gate = Arc::new(WriteGate::default());
        let first = gate.acquire(Duration::ZERO).unwrap();
        assert!(gate.acquire(Duration::from_millis(1)).is_none(), "gate held twice");
        let waiter = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.acquire(Duration::from_secs(30)).is_some())
        };
        drop(first);
        assert!(waiter.join().unwrap());
    }
}
