//! Every limit a client can hit, counted for `/metrics` and logged without flooding the log:
//! the first hit of each kind is logged at once, later ones at most once a second each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    StatementTimeout,
    StatementMemory,
    TransactionTimeout,
    DatabaseSize,
    BodySize,
    BodyTimeout,
    Connections,
    Requests,
    Streams,
    StreamsPerNamespace,
    StreamsPerConnection,
    ResponseSize,
    TotalResponseSize,
    StalledReader,
}

impl Limit {
    const ALL: [Limit; 14] = [
        Limit::StatementTimeout,
        Limit::StatementMemory,
        Limit::TransactionTimeout,
        Limit::DatabaseSize,
        Limit::BodySize,
        Limit::BodyTimeout,
        Limit::Connections,
        Limit::Requests,
        Limit::Streams,
        Limit::StreamsPerNamespace,
        Limit::StreamsPerConnection,
        Limit::ResponseSize,
        Limit::TotalResponseSize,
        Limit::StalledReader,
    ];

    /// The label in `/metrics`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::StatementTimeout => "statement_timeout",
            Limit::StatementMemory => "max_statement_memory",
            Limit::TransactionTimeout => "transaction_timeout",
            Limit::DatabaseSize => "max_db_size",
            Limit::BodySize => "max_body_size",
            Limit::BodyTimeout => "body_read_timeout",
            Limit::Connections => "max_concurrent_connections",
            Limit::Requests => "max_concurrent_requests",
            Limit::Streams => "max_streams",
            Limit::StreamsPerNamespace => "max_streams_per_namespace",
            Limit::StreamsPerConnection => "max_streams_per_connection",
            Limit::ResponseSize => "max_response_size",
            Limit::TotalResponseSize => "max_total_response_size",
            Limit::StalledReader => "unread_answer_timeout",
        }
    }
}

/// How often each kind of hit is logged at most, after its first.
const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Default, Debug)]
pub struct LimitHits {
    counts: [AtomicU64; Limit::ALL.len()],
    logged_at: Mutex<[Option<Instant>; Limit::ALL.len()]>,
}

impl LimitHits {
    /// Counts a hit of `limit`; `detail` (namespace, peer, sizes) goes to the log.
    pub fn hit(&self, limit: Limit, detail: impl std::fmt::Display) {
        let total = self.counts[limit as usize].fetch_add(1, Ordering::Relaxed) + 1;
        let mut logged = self.logged_at.lock().unwrap_or_else(|e| e.into_inner());
        let last = &mut logged[limit as usize];
        if last.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            drop(logged);
            tracing::warn!(limit = limit.name(), total, "limit hit: {detail}");
        }
    }

    pub fn count(&self, limit: Limit) -> u64 {
        self.counts[limit as usize].load(Ordering::Relaxed)
    }

    /// `(limit name, hits)` for every limit.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Limit::ALL.iter().map(|l| (l.name(), self.count(*l)))
    }
}
