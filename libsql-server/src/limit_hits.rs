//! Every limit a client can hit, and every refusal of its credentials, counted for `/metrics`
//! and logged without flooding the log: the first of each kind is logged at once, later ones
//! at most once a second each.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A place among `places` (the requests running at once, say): at once if one is free, else
/// after a wait of at most `wait`; `None` if none freed up in time.
pub async fn take_place(places: &Arc<Semaphore>, wait: Duration) -> Option<OwnedSemaphorePermit> {
    if let Ok(place) = places.clone().try_acquire_owned() {
        return Some(place);
    }
    match tokio::time::timeout(wait, places.clone().acquire_owned()).await {
        Ok(Ok(place)) => Some(place),
        _ => None,
    }
}

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
    WebSockets,
    ReplicationStreams,
    RequestValues,
}

impl Limit {
    const ALL: [Limit; 17] = [
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
        Limit::WebSockets,
        Limit::ReplicationStreams,
        Limit::RequestValues,
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
            Limit::WebSockets => "max_websockets",
            Limit::ReplicationStreams => "max_replication_streams",
            Limit::RequestValues => "max_request_values",
        }
    }
}

/// Why a client's credential was refused (`sqld_auth_refused_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Missing,
    Malformed,
    BadSignature,
    Expired,
    WrongNamespace,
    BadPassword,
    ReadOnly,
}

impl Refusal {
    const ALL: [Refusal; 7] = [
        Refusal::Missing,
        Refusal::Malformed,
        Refusal::BadSignature,
        Refusal::Expired,
        Refusal::WrongNamespace,
        Refusal::BadPassword,
        Refusal::ReadOnly,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::Missing => "missing",
            Refusal::Malformed => "malformed",
            Refusal::BadSignature => "bad_signature",
            Refusal::Expired => "expired",
            Refusal::WrongNamespace => "wrong_namespace",
            Refusal::BadPassword => "bad_password",
            Refusal::ReadOnly => "read_only",
        }
    }
}

/// How often each kind of hit is logged at most, after its first.
const LOG_EVERY: Duration = Duration::from_secs(1);

#[derive(Default, Debug)]
pub struct LimitHits {
    counts: [AtomicU64; Limit::ALL.len()],
    logged_at: Mutex<[Option<Instant>; Limit::ALL.len()]>,
    refusals: [AtomicU64; Refusal::ALL.len()],
    refusals_logged_at: Mutex<[Option<Instant>; Refusal::ALL.len()]>,
}

impl LimitHits {
    /// Counts a hit of `limit`; `detail` (namespace, peer, sizes) goes to the log.
    pub fn hit(&self, limit: Limit, detail: impl std::fmt::Display) {
        let total = self.counts[limit as usize].fetch_add(1, Ordering::Relaxed) + 1;
        if due(&self.logged_at, limit as usize) {
            tracing::warn!(limit = limit.name(), total, "limit hit: {detail}");
        }
    }

    /// Counts a refused credential; `detail` (namespace, reason; never the credential) goes
    /// to the log.
    pub fn refuse(&self, refusal: Refusal, detail: impl std::fmt::Display) {
        let total = self.refusals[refusal as usize].fetch_add(1, Ordering::Relaxed) + 1;
        if due(&self.refusals_logged_at, refusal as usize) {
            tracing::info!(reason = refusal.name(), total, "authentication refused: {detail}");
        }
    }

    /// `(reason, refusals)` for every reason.
    pub fn refusals(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Refusal::ALL.iter().map(|r| (r.name(), self.refusals[*r as usize].load(Ordering::Relaxed)))
    }

    pub fn count(&self, limit: Limit) -> u64 {
        self.counts[limit as usize].load(Ordering::Relaxed)
    }

    /// `(limit name, hits)` for every limit.
    pub fn all(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Limit::ALL.iter().map(|l| (l.name(), self.count(*l)))
    }
}

/// Whether kind `index` may be logged now (and records that it is).
fn due<const N: usize>(logged_at: &Mutex<[Option<Instant>; N]>, index: usize) -> bool {
    let mut logged = logged_at.lock().unwrap_or_else(|e| e.into_inner());
    let last = &mut logged[index];
    let due = last.is_none_or(|at| at.elapsed() >= LOG_EVERY);
    if due {
        *last = Some(Instant::now());
    }
    due
}
