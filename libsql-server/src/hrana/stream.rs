//! Hrana streams and their batons.
//!
//! A stream is one SQLite connection plus the SQL texts stored on it. Over HTTP a stream lives
//! between requests only as a *baton*: the response hands out a fresh one, the next request
//! brings it back. An interactive transaction spans requests this way. A stream left idle past
//! the expiry is dropped (rolling its transaction back and releasing the write lock) and its
//! baton is answered with a clear "expired" error for a while after.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libsql_hrana::proto::{
    Batch, BatchResult, BatchStreamResp, CloseSqlStreamResp, CloseStreamResp, DescribeStreamResp, ExecuteStreamResp,
    GetAutocommitStreamResp, SequenceStreamResp, StoreSqlStreamResp, StreamRequest, StreamResponse, StreamResult,
};
use tokio::time::Instant;

use super::budget::ResponseBudget;
use super::forward::{Remote, Route};
use super::stmt::{self, SqlStore};
use super::{batch, RequestError, StmtError};
use crate::database::interrupt::CancelTarget;
use crate::database::{Access, Connection};
use crate::limit_hits::{Limit, LimitHits};
use crate::namespace::{Namespace, NamespaceName};

pub struct Stream {
    ns: Arc<Namespace>,
    /// `None` once the stream is closed.
    conn: Option<Connection>,
    sqls: SqlStore,
    /// The client connection that opened it, when the transport has one: its streams count
    /// against its own bound.
    origin: Option<u64>,
    /// On a replica: the stream's standing with the primary.
    remote: Option<Remote>,
}

impl Stream {
    /// Opens a stream on a connection of `ns` for the client connection `origin`. Blocking.
    pub fn open(ns: Arc<Namespace>, origin: Option<u64>) -> Result<Self, RequestError> {
        ns.check_live()?;
        let conn = ns.db().connection().map_err(|e| ns.database_error(e))?;
        let remote = ns.replica().cloned().map(Remote::new);
        Ok(Stream { ns, conn: Some(conn), sqls: SqlStore::default(), origin, remote })
    }

    pub fn is_closed(&self) -> bool {
        self.conn.is_none()
    }

    /// Lets `target` stop this stream's statements if the request's client goes away.
    pub fn attach(&self, target: &CancelTarget) {
        if let Some(conn) = &self.conn {
            target.attach(conn.interrupt());
        }
    }

    /// What the current request's client may do on this stream: a stream outlives requests,
    /// each of which is authenticated on its own.
    pub fn grant(&mut self, access: Access) {
        if let Some(conn) = &mut self.conn {
            conn.set_access(access);
        }
    }

    /// True when the stream holds its namespace's write lock past the transaction time limit.
    pub fn transaction_expired(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.transaction_expired())
    }

    pub fn namespace(&self) -> &NamespaceName {
        self.ns.name()
    }

    /// Handles one request of a pipeline. Blocking.
    pub fn handle(&mut self, request: &StreamRequest, budget: &mut ResponseBudget) -> StreamResult {
        match self.respond(request, budget) {
            Ok(response) => StreamResult::Ok { response },
            Err(e) => StreamResult::Error { error: e.to_proto() },
        }
    }

    fn respond(&mut self, request: &StreamRequest, budget: &mut ResponseBudget) -> Result<StreamResponse, StmtError> {
        if let StreamRequest::Close(_) = request {
            self.close();
            return Ok(StreamResponse::Close(CloseStreamResp {}));
        }
        if self.remote.is_some() {
            if let Some(response) = self.forwarded(request, budget)? {
                return Ok(response);
            }
        }
        let (conn, sqls) = self.parts()?;
        Ok(match request {
            StreamRequest::Execute(req) => StreamResponse::Execute(ExecuteStreamResp { result: stmt::execute(conn, sqls, budget, &req.stmt)? }),
            StreamRequest::Batch(req) => StreamResponse::Batch(BatchStreamResp { result: batch::run(conn, sqls, budget, &req.batch) }),
            StreamRequest::Sequence(req) => {
                stmt::sequence(conn, sqls, req.sql.as_deref(), req.sql_id)?;
                StreamResponse::Sequence(SequenceStreamResp {})
            }
            StreamRequest::Describe(req) => {
                StreamResponse::Describe(DescribeStreamResp { result: stmt::describe(conn, sqls, req.sql.as_deref(), req.sql_id)? })
            }
            StreamRequest::StoreSql(req) => {
                sqls.store(req.sql_id, req.sql.clone())?;
                StreamResponse::StoreSql(StoreSqlStreamResp {})
            }
            StreamRequest::CloseSql(req) => {
                sqls.close(req.sql_id);
                StreamResponse::CloseSql(CloseSqlStreamResp {})
            }
            StreamRequest::GetAutocommit(_) => {
                StreamResponse::GetAutocommit(GetAutocommitStreamResp { is_autocommit: conn.sqlite().is_autocommit() })
            }
            StreamRequest::Close(_) => unreachable!("handled above"),
            StreamRequest::None => return Err(StmtError::ArgsInvalid("a request without a type".into())),
        })
    }

    /// Whether the stream's connection is outside any transaction (a closed one is), here
    /// and, on a replica, on the primary.
    pub fn is_autocommit(&self) -> bool {
        self.conn.as_ref().is_none_or(|c| c.sqlite().is_autocommit()) && !self.remote.as_ref().is_some_and(Remote::in_transaction)
    }

    /// On a replica, a request the primary must run, run there; `None` for one the copy runs
    /// (after it caught up with the stream's last write). Blocking.
    fn forwarded(&mut self, request: &StreamRequest, budget: &mut ResponseBudget) -> Result<Option<StreamResponse>, StmtError> {
        Ok(Some(match request {
            StreamRequest::Execute(req) => match self.forward_execute(&req.stmt, budget)? {
                Some(result) => StreamResponse::Execute(ExecuteStreamResp { result }),
                None => return Ok(None),
            },
            StreamRequest::Batch(req) => match self.forward_batch(&req.batch, budget)? {
                Some(result) => StreamResponse::Batch(BatchStreamResp { result }),
                None => return Ok(None),
            },
            StreamRequest::Sequence(req) => match self.forward_sequence(req.sql.as_deref(), req.sql_id)? {
                Some(()) => StreamResponse::Sequence(SequenceStreamResp {}),
                None => return Ok(None),
            },
            StreamRequest::Describe(_) => {
                if let Some(remote) = &mut self.remote {
                    remote.catch_up()?;
                }
                return Ok(None);
            }
            StreamRequest::GetAutocommit(_) if self.remote.as_ref().is_some_and(Remote::in_transaction) => {
                StreamResponse::GetAutocommit(GetAutocommitStreamResp { is_autocommit: false })
            }
            _ => return Ok(None),
        }))
    }

    /// On a replica: the stream's connection, stored SQL texts, standing with the primary and
    /// namespace name (`None` on a primary, or once the stream is closed).
    fn remote_parts(&mut self) -> Result<Option<(&mut Connection, &mut SqlStore, &mut Remote, &NamespaceName)>, StmtError> {
        let Stream { conn: Some(conn), sqls, remote: Some(remote), ns, .. } = self else {
            return Ok(None);
        };
        ns.check_live()?;
        Ok(Some((conn, sqls, remote, ns.name())))
    }

    /// On a replica, runs `stmt` on the primary if it must run there.
    fn forward_execute(
        &mut self,
        stmt: &libsql_hrana::proto::Stmt,
        budget: &mut ResponseBudget,
    ) -> Result<Option<libsql_hrana::proto::StmtResult>, StmtError> {
        let Some((conn, sqls, remote, ns)) = self.remote_parts()? else {
            return Ok(None);
        };
        let sql = sqls.resolve(stmt.sql.as_deref(), stmt.sql_id)?;
        match remote.route(conn, [sql])? {
            Route::Copy => Ok(None),
            Route::Primary => remote.execute(ns, conn, sqls, budget, stmt).map(Some),
        }
    }

    /// On a replica, runs `batch` on the primary if any of its steps must run there.
    fn forward_batch(&mut self, batch: &Batch, budget: &mut ResponseBudget) -> Result<Option<BatchResult>, StmtError> {
        let Some((conn, sqls, remote, ns)) = self.remote_parts()? else {
            return Ok(None);
        };
        // A step whose text cannot be found fails wherever the batch runs.
        let texts = batch.steps.iter().filter_map(|step| sqls.resolve(step.stmt.sql.as_deref(), step.stmt.sql_id).ok());
        match remote.route(conn, texts)? {
            Route::Copy => Ok(None),
            Route::Primary => remote.batch(ns, conn, sqls, budget, batch).map(Some),
        }
    }

    /// On a replica, runs a `sequence` on the primary if any of its statements must run there.
    fn forward_sequence(&mut self, sql: Option<&str>, sql_id: Option<i32>) -> Result<Option<()>, StmtError> {
        let Some((conn, sqls, remote, ns)) = self.remote_parts()? else {
            return Ok(None);
        };
        let sql = sqls.resolve(sql, sql_id)?;
        match remote.route_sequence(conn, sql)? {
            None => Ok(None),
            Some(statements) => remote.sequence(ns, conn, &statements).map(Some),
        }
    }

    /// The frame_no of the last frame its namespace's log holds: a replica that has it has
    /// every write this stream made. Blocking (the log's lock).
    pub fn last_frame_no(&self) -> Option<u64> {
        self.ns.db().logger().and_then(|logger| logger.committed_position()).map(|position| position.frame_no)
    }

    /// Runs a batch (the cursor endpoint). Blocking.
    pub fn run_batch(&mut self, batch: &Batch, budget: &mut ResponseBudget) -> Result<BatchResult, StmtError> {
        if let Some(result) = self.forward_batch(batch, budget)? {
            return Ok(result);
        }
        let (conn, sqls) = self.parts()?;
        Ok(batch::run(conn, sqls, budget, batch))
    }

    fn parts(&mut self) -> Result<(&mut Connection, &mut SqlStore), StmtError> {
        self.ns.check_live()?;
        match self.conn.as_mut() {
            Some(conn) => Ok((conn, &mut self.sqls)),
            None => Err(StmtError::StreamClosed),
        }
    }

    /// Gives the connection back to the namespace's pool (rolling back an open transaction).
    /// Blocking.
    pub fn close(&mut self) {
        if let Some(remote) = &mut self.remote {
            remote.end(self.ns.name());
        }
        if let Some(conn) = self.conn.take() {
            self.ns.db().recycle(conn);
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.close();
    }
}

/// Drops streams on the blocking pool: dropping one may roll back a transaction (file I/O).
pub fn drop_off_runtime(streams: Vec<Stream>) {
    if !streams.is_empty() {
        tokio::task::spawn_blocking(move || drop(streams));
    }
}

/// How many streams may wait between requests, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// An idle stream is rolled back and dropped after this.
    pub expiry: Duration,
    /// Over all namespaces (each parked stream holds a SQLite connection: file descriptors).
    pub max_streams: usize,
    /// For one namespace, so one tenant cannot take every stream.
    pub max_per_namespace: usize,
    /// Opened over one client connection (over HTTP a stream outlives the connection that
    /// opened it, and counts against it until it ends).
    pub max_per_connection: usize,
}

/// The streams parked between requests, by baton.
pub struct StreamRegistry {
    inner: Mutex<Registry>,
    limits: StreamLimits,
    hits: Arc<LimitHits>,
}

#[derive(Default)]
struct Registry {
    parked: HashMap<String, Parked>,
    /// Streams their transport holds between requests (a WebSocket's), by namespace.
    held: HashMap<NamespaceName, usize>,
    held_total: usize,
    /// Parked streams per namespace and per client connection that opened them.
    per_namespace: HashMap<NamespaceName, usize>,
    per_origin: HashMap<u64, usize>,
    /// Batons of expired streams, kept a while so their clients get "expired", not "unknown".
    expired: HashMap<String, Expired>,
}

/// Why a parked stream was dropped.
#[derive(Clone, Copy)]
enum Expiry {
    Idle,
    /// It held the write lock past the transaction time limit.
    Transaction,
}

struct Expired {
    why: Expiry,
    at: Instant,
}

impl Expiry {
    fn error(self) -> RequestError {
        match self {
            Expiry::Idle => RequestError::ExpiredBaton,
            Expiry::Transaction => RequestError::TransactionTimedOut,
        }
    }
}

struct Parked {
    stream: Stream,
    parked_at: Instant,
}

impl Registry {
    fn insert(&mut self, baton: String, parked: Parked) {
        *self.per_namespace.entry(parked.stream.namespace().clone()).or_default() += 1;
        if let Some(origin) = parked.stream.origin {
            *self.per_origin.entry(origin).or_default() += 1;
        }
        self.parked.insert(baton, parked);
    }

    fn remove(&mut self, baton: &str) -> Option<Parked> {
        let parked = self.parked.remove(baton)?;
        decrement(&mut self.per_namespace, parked.stream.namespace());
        if let Some(origin) = &parked.stream.origin {
            decrement(&mut self.per_origin, origin);
        }
        Some(parked)
    }
}

impl Registry {
    /// Whether one more stream of `ns` fits the server's and the namespace's bounds (parked
    /// and held streams together).
    fn room_for(&self, ns: &NamespaceName, limits: &StreamLimits) -> Result<(), ParkRefused> {
        if self.parked.len() + self.held_total >= limits.max_streams {
            return Err(ParkRefused::ServerFull);
        }
        let of_ns = self.per_namespace.get(ns).copied().unwrap_or(0) + self.held.get(ns).copied().unwrap_or(0);
        if of_ns >= limits.max_per_namespace {
            return Err(ParkRefused::NamespaceFull);
        }
        Ok(())
    }
}

/// A stream's place in the bounds while its transport holds it (see [`StreamRegistry::hold`]).
pub struct Held {
    registry: Arc<StreamRegistry>,
    ns: NamespaceName,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut inner = self.registry.inner.lock().unwrap_or_else(|e| e.into_inner());
        decrement(&mut inner.held, &self.ns);
        inner.held_total -= 1;
    }
}

fn decrement<K: std::hash::Hash + Eq>(counts: &mut HashMap<K, usize>, key: &K) {
    if let Some(n) = counts.get_mut(key) {
        *n -= 1;
        if *n == 0 {
            counts.remove(key);
        }
    }
}

/// Why a stream could not be parked: which bound is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(clippy::enum_variant_names)]
pub enum ParkRefused {
    ServerFull,
    NamespaceFull,
    ConnectionFull,
}

/// How long the baton of an expired stream is remembered.
const EXPIRED_MEMORY: Duration = Duration::from_secs(600);

impl StreamRegistry {
    pub fn new(limits: StreamLimits, hits: Arc<LimitHits>) -> Self {
        StreamRegistry { inner: Mutex::default(), limits, hits }
    }

    pub fn expiry(&self) -> Duration {
        self.limits.expiry
    }

    /// Takes the stream of `baton` out of the registry for one request.
    pub fn take(&self, baton: &str, ns: &NamespaceName) -> Result<Stream, RequestError> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some(parked) = inner.remove(baton) else {
            return Err(inner.expired.get(baton).map_or(RequestError::UnknownBaton, |e| e.why.error()));
        };
        if let Some(why) = self.expiry_of(&parked) {
            inner.expired.insert(baton.to_owned(), Expired { why, at: Instant::now() });
            drop(inner);
            drop_off_runtime(vec![parked.stream]);
            return Err(why.error());
        }
        if parked.stream.namespace() != ns {
            inner.insert(baton.to_owned(), parked);
            return Err(RequestError::BatonNamespaceMismatch);
        }
        Ok(parked.stream)
    }

    /// Whether a new stream of `ns` may open and park: checked before it runs anything, so
    /// a refusal never hides work done. (Streams running at once may pass the bound by at
    /// most their number: bounded by the request limit.)
    pub fn check_room(&self, ns: &NamespaceName, origin: Option<u64>) -> Result<(), ParkRefused> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.room_for(ns, &self.limits)?;
        if origin.and_then(|o| inner.per_origin.get(&o)).is_some_and(|n| *n >= self.limits.max_per_connection) {
            return Err(ParkRefused::ConnectionFull);
        }
        Ok(())
    }

    /// Counts a stream its transport holds (a WebSocket's) against the server's and `ns`'s
    /// bounds, until the returned [`Held`] is dropped.
    pub fn hold(self: &Arc<Self>, ns: &NamespaceName) -> Result<Held, ParkRefused> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.room_for(ns, &self.limits)?;
        *inner.held.entry(ns.clone()).or_default() += 1;
        inner.held_total += 1;
        Ok(Held { registry: self.clone(), ns: ns.clone() })
    }

    /// Parks a stream under `key`, chosen by its transport (a proxy client's id), until its
    /// next request; a stream already parked under the key is dropped (rolled back).
    pub fn park_as(&self, key: &str, stream: Stream) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let replaced = inner.remove(key);
        inner.insert(key.to_owned(), Parked { stream, parked_at: Instant::now() });
        drop(inner);
        if let Some(replaced) = replaced {
            drop_off_runtime(vec![replaced.stream]);
        }
    }

    /// Forgets that the stream of `key` expired (it was reported once), so the key can be
    /// used again.
    pub fn forget(&self, key: &str) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).expired.remove(key);
    }

    /// Parks a stream until its next request; returns its new baton. A new stream was let in
    /// by `check_room`; a continuing one had its place.
    pub fn park(&self, stream: Stream) -> String {
        let baton = uuid::Uuid::new_v4().simple().to_string();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.insert(baton.clone(), Parked { stream, parked_at: Instant::now() });
        baton
    }

    /// Whether a parked stream must go: idle past the expiry, or holding the write lock past
    /// its transaction's time limit (so that other writers proceed).
    fn expiry_of(&self, parked: &Parked) -> Option<Expiry> {
        if parked.stream.transaction_expired() {
            Some(Expiry::Transaction)
        } else if parked.parked_at.elapsed() > self.limits.expiry {
            Some(Expiry::Idle)
        } else {
            None
        }
    }

    /// Removes the streams that must go (see `expiry_of`); the caller drops them off the
    /// runtime, which rolls their transactions back.
    pub fn reap(&self) -> Vec<Stream> {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let stale: Vec<(String, Expiry)> = inner.parked.iter().filter_map(|(b, p)| Some((b.clone(), self.expiry_of(p)?))).collect();
        let mut reaped = Vec::with_capacity(stale.len());
        for (baton, why) in stale {
            if let Some(parked) = inner.remove(&baton) {
                match why {
                    Expiry::Idle => {
                        tracing::debug!(namespace = %parked.stream.namespace(), "idle stream expired")
                    }
                    Expiry::Transaction => self.hits.hit(
                        Limit::TransactionTimeout,
                        format_args!("namespace {}: an idle transaction held the write lock; rolled back", parked.stream.namespace()),
                    ),
                }
                reaped.push(parked.stream);
                inner.expired.insert(baton, Expired { why, at: now });
            }
        }
        inner.expired.retain(|_, e| now.duration_since(e.at) < EXPIRED_MEMORY);
        reaped
    }

    /// Removes every stream (shutdown).
    pub fn drain(&self) -> Vec<Stream> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.per_namespace.clear();
        inner.per_origin.clear();
        inner.parked.drain().map(|(_, p)| p.stream).collect()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).parked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Stream {
    /// Describes one statement (a replica's forwarded `Describe`). Blocking.
    pub fn describe(&mut self, sql: &str) -> Result<libsql_hrana::proto::DescribeResult, StmtError> {
        if let Some(remote) = &mut self.remote {
            remote.catch_up()?;
        }
        let (conn, sqls) = self.parts()?;
        stmt::describe(conn, sqls, Some(sql), None)
    }

    /// Executes one statement (Hrana v1 over HTTP). Blocking.
    pub fn execute(
        &mut self,
        stmt: &libsql_hrana::proto::Stmt,
        budget: &mut ResponseBudget,
    ) -> Result<libsql_hrana::proto::StmtResult, StmtError> {
        if let Some(result) = self.forward_execute(stmt, budget)? {
            return Ok(result);
        }
        let (conn, sqls) = self.parts()?;
        stmt::execute(conn, sqls, budget, stmt)
    }
}
