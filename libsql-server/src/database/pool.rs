//! The idle connections of one database, kept open for the next request: opening one costs
//! far more than a small request (SQLite reads the schema, the server registers its functions
//! and pragmas), so a pool smaller than the number of requests that run at once turns every
//! request past it into an open and a close.
//!
//! Each database keeps up to [`OWN_IDLE`] idle connections of its own. Past that, up to
//! [`MAX_IDLE`], each one kept takes a place in an [`IdleBudget`] that every database of the
//! server shares (`--max-idle-connections`): an idle connection keeps its page cache, so the
//! memory idle connections hold stays bounded however many namespaces are open, and a busy
//! namespace keeps as many as its concurrent requests use while the budget lasts. Those past
//! its own are closed once unused for [`EXTRA_IDLE_TTL`] (a periodic sweep), so a namespace
//! that had a burst, or opened and closed many streams, gives its places back.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Idle connections a database keeps without taking from the shared budget.
pub const OWN_IDLE: usize = 8;
/// The most idle connections one database keeps.
pub const MAX_IDLE: usize = 64;
/// How long an idle connection past a database's own stays unused before it is closed.
pub const EXTRA_IDLE_TTL: Duration = Duration::from_secs(60);

/// Places for idle connections beyond each database's own, shared by every database.
#[derive(Debug)]
pub struct IdleBudget {
    free: AtomicUsize,
}

impl IdleBudget {
    pub fn new(places: usize) -> Arc<Self> {
        Arc::new(IdleBudget { free: AtomicUsize::new(places) })
    }

    fn try_take(&self) -> bool {
        self.free.fetch_update(Ordering::AcqRel, Ordering::Acquire, |free| free.checked_sub(1)).is_ok()
    }

    fn give_back(&self, places: usize) {
        self.free.fetch_add(places, Ordering::AcqRel);
    }

    /// Places not taken now.
    pub fn free(&self) -> usize {
        self.free.load(Ordering::Acquire)
    }
}

/// One database's idle connections, each with when it was put back (the most recent last).
/// The budget places it holds are always `len - OWN_IDLE` (when positive), and go back as
/// connections leave or the pool is dropped.
pub struct IdlePool<C> {
    idle: Mutex<VecDeque<(C, Instant)>>,
    budget: Arc<IdleBudget>,
}

impl<C> IdlePool<C> {
    pub fn new(budget: Arc<IdleBudget>) -> Self {
        IdlePool { idle: Mutex::new(VecDeque::new()), budget }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(C, Instant)>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn take(&self) -> Option<C> {
        let mut idle = self.lock();
        let (conn, _) = idle.pop_back()?;
        if idle.len() >= OWN_IDLE {
            self.budget.give_back(1);
        }
        Some(conn)
    }

    /// Keeps `conn` if there is room for it; otherwise gives it back (for the caller to close
    /// outside the pool's lock).
    pub fn put(&self, conn: C) -> Option<C> {
        let mut idle = self.lock();
        if idle.len() < OWN_IDLE || (idle.len() < MAX_IDLE && self.budget.try_take()) {
            idle.push_back((conn, Instant::now()));
            return None;
        }
        Some(conn)
    }

    /// Takes out (for the caller to close) the connections past the pool's own that have been
    /// unused for [`EXTRA_IDLE_TTL`] at `now`, giving their places back.
    pub fn expire(&self, now: Instant) -> Vec<C> {
        let mut idle = self.lock();
        let mut expired = Vec::new();
        while idle.len() > OWN_IDLE && idle.front().is_some_and(|(_, since)| now.saturating_duration_since(*since) >= EXTRA_IDLE_TTL) {
            expired.extend(idle.pop_front().map(|(conn, _)| conn));
            self.budget.give_back(1);
        }
        expired
    }

    /// Takes every idle connection out (for the caller to close).
    pub fn drain(&self) -> Vec<C> {
        let drained = std::mem::take(&mut *self.lock());
        self.budget.give_back(drained.len().saturating_sub(OWN_IDLE));
        drained.into_iter().map(|(conn, _)| conn).collect()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

impl<C> Drop for IdlePool<C> {
    fn drop(&mut self) {
        let idle = self.idle.get_mut().unwrap_or_else(|e| e.into_inner());
        self.budget.give_back(idle.len().saturating_sub(OWN_IDLE));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_its_own_a_pool_keeps_connections_only_while_the_shared_budget_lasts() {
        let budget = IdleBudget::new(10);
        let busy = IdlePool::new(budget.clone());
        let other = IdlePool::new(budget.clone());
        let refused: Vec<u32> = (0..OWN_IDLE as u32 + 15).filter_map(|c| busy.put(c)).collect();
        assert_eq!(busy.len(), OWN_IDLE + 10);
        assert_eq!(refused.len(), 5, "connections past the budget are handed back to be closed");
        assert_eq!(budget.free(), 0);

        // Another database still keeps its own, and nothing more.
        assert!((0..OWN_IDLE as u32).all(|c| other.put(c).is_none()));
        assert_eq!(other.put(99), Some(99));

        // Taking connections out gives their places back, down to the pool's own.
        for _ in 0..12 {
            busy.take().unwrap();
        }
        assert_eq!(budget.free(), 10);
        assert_eq!(other.put(7), None, "the place another pool gave back is taken");
        assert_eq!(budget.free(), 9);
        drop(other);
        assert_eq!(budget.free(), 10, "a dropped pool gives its places back");
        let drained = busy.drain();
        assert_eq!((drained.len(), budget.free()), (OWN_IDLE + 10 - 12, 10));
    }

    #[test]
    fn connections_past_a_pools_own_expire_unused_and_give_their_places_back() {
        let budget = IdleBudget::new(10);
        let pool = IdlePool::new(budget.clone());
        assert!((0..OWN_IDLE as u32 + 4).all(|c| pool.put(c).is_none()));
        assert_eq!(budget.free(), 6);
        assert!(pool.expire(Instant::now()).is_empty(), "not unused long enough");
        // Two taken and put back: they are the freshest, so the oldest go first.
        let (a, b) = (pool.take().unwrap(), pool.take().unwrap());
        let later = Instant::now() + EXTRA_IDLE_TTL;
        assert!(pool.put(a).is_none() && pool.put(b).is_none());
        let expired = pool.expire(later);
        assert_eq!(expired, vec![0, 1, 2, 3], "the four oldest, past the pool's own");
        assert_eq!((pool.len(), budget.free()), (OWN_IDLE, 10));
        assert!(pool.expire(later + EXTRA_IDLE_TTL).is_empty(), "the pool's own stay");
    }

    #[test]
    fn a_pool_never_keeps_more_than_its_maximum() {
        let budget = IdleBudget::new(1_000);
        let pool = IdlePool::new(budget.clone());
        let refused = (0..MAX_IDLE + 3).filter_map(|c| pool.put(c)).count();
        assert_eq!((pool.len(), refused), (MAX_IDLE, 3));
        assert_eq!(budget.free(), 1_000 - (MAX_IDLE - OWN_IDLE));
        drop(pool);
        assert_eq!(budget.free(), 1_000);
    }
}
