//! Hrana, the libSQL protocol clients speak: pipelines of stream requests and cursors over
//! batches. This module knows streams, statements and batons; it knows nothing of HTTP (the
//! `http` module parses requests and maps [`RequestError`]s to statuses).

mod batch;
pub mod budget;
mod error;
mod forward;
pub mod shape;
pub mod stmt;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use libsql_hrana::proto::{Batch, BatchResult, CursorEntry, PipelineReqBody, PipelineRespBody, Stmt, StmtResult, StreamRequest};

use budget::{Hold, ResponseBudget, ResponseBudgets};
pub use error::{RequestError, StmtError};
pub use batch::{cursor_entries, JsonCursorEntry};
pub use stream::{drop_off_runtime, Held, Stream, StreamLimits, StreamRegistry};

use crate::blocking;
use crate::database::interrupt::CancelOnDrop;
use crate::database::Access;
use crate::limit_hits::{Limit, LimitHits};
use crate::namespace::{Namespace, NamespaceName, NamespaceStore};

/// The Hrana service of one server: the namespace store plus the parked streams. Cloned for
/// every request (axum's state), so it is one shared pointer.
#[derive(Clone)]
pub struct Hrana(Arc<Service>);

pub struct Service {
    store: NamespaceStore,
    streams: Arc<StreamRegistry>,
    budgets: Arc<ResponseBudgets>,
    hits: Arc<LimitHits>,
}

impl std::ops::Deref for Hrana {
    type Target = Service;

    fn deref(&self) -> &Service {
        &self.0
    }
}

/// Where a request's stream comes from: one held between requests (parked under a baton, or a
/// WebSocket's), or a new one on a namespace, opened on the blocking thread that runs the
/// request.
enum StreamSource {
    Held(Stream),
    Open(Arc<Namespace>, Option<u64>),
}

impl StreamSource {
    async fn into_stream(self) -> Result<Stream, RequestError> {
        match self {
            StreamSource::Held(stream) => Ok(stream),
            StreamSource::Open(ns, origin) => blocking::run(move || Stream::open(ns, origin)).await?,
        }
    }
}

/// An answer, with the share of the response bound it holds until it has been sent.
pub struct Answered<T> {
    pub answer: T,
    pub budget: ResponseBudget,
}

impl Hrana {
    pub fn new(store: NamespaceStore, limits: StreamLimits, budgets: ResponseBudgets, hits: Arc<LimitHits>) -> Self {
        let streams = Arc::new(StreamRegistry::new(limits, hits.clone()));
        Hrana(Arc::new(Service { store, streams, budgets: Arc::new(budgets), hits }))
    }

    pub fn store(&self) -> &NamespaceStore {
        &self.store
    }

    pub fn streams(&self) -> &Arc<StreamRegistry> {
        &self.streams
    }

    /// Runs a pipeline: every request in order on one stream, the stream's baton handed back
    /// unless the pipeline closed it.
    /// `origin` is the client connection the request came over, when the transport has one.
    pub async fn pipeline(
        &self,
        ns: &NamespaceName,
        access: Access,
        body: PipelineReqBody,
        origin: Option<u64>,
        hold: Hold,
    ) -> Result<Answered<PipelineRespBody>, RequestError> {
        let parks = !matches!(body.requests.last(), Some(StreamRequest::Close(_)));
        let stream = self.stream_for(ns, body.baton.as_deref(), parks, origin).await?;
        let requests = body.requests;
        let (baton, results, budget) =
            self.run_on(stream, access, hold, move |stream, budget| requests.iter().map(|r| stream.handle(r, budget)).collect()).await?;
        Ok(Answered { answer: PipelineRespBody { baton, base_url: None, results }, budget })
    }

    /// Runs a batch on a stream for the cursor endpoint: the entries, and the baton.
    pub async fn cursor(
        &self,
        ns: &NamespaceName,
        access: Access,
        baton: Option<&str>,
        batch: Batch,
        origin: Option<u64>,
        hold: Hold,
    ) -> Result<Answered<(Option<String>, Vec<CursorEntry>)>, RequestError> {
        let stream = self.stream_for(ns, baton, true, origin).await?;
        let (baton, result, budget) = self.run_on(stream, access, hold, move |stream, budget| stream.run_batch(&batch, budget)).await?;
        let entries = match result {
            Ok(result) => batch::cursor_entries(result),
            Err(e) => vec![CursorEntry::Error { error: e.to_proto() }],
        };
        Ok(Answered { answer: (baton, entries), budget })
    }

    /// Runs `f` on the stream of `source` on the blocking pool (stopped if the request's client
    /// goes away), then parks the stream if it is still open: its baton, `f`'s result, and the
    /// budget.
    async fn run_on<R: Send + 'static>(
        &self,
        source: StreamSource,
        access: Access,
        hold: Hold,
        f: impl FnOnce(&mut Stream, &mut ResponseBudget) -> R + Send + 'static,
    ) -> Result<(Option<String>, R, ResponseBudget), RequestError> {
        let (stream, result, budget) = self.run_from(source, access, hold, f).await?;
        Ok(((!stream.is_closed()).then(|| self.streams.park(stream)), result, budget))
    }

    /// Runs `f` on a stream its transport holds between requests (a WebSocket's), on the
    /// blocking pool, stopped if this future is dropped; gives the stream back with `f`'s
    /// result and the budget its answer holds.
    pub async fn run_held<R: Send + 'static>(
        &self,
        stream: Stream,
        access: Access,
        hold: Hold,
        f: impl FnOnce(&mut Stream, &mut ResponseBudget) -> R + Send + 'static,
    ) -> Result<(Stream, R, ResponseBudget), RequestError> {
        self.run_from(StreamSource::Held(stream), access, hold, f).await
    }

    /// Runs `f` on the stream of `source` in one trip to the blocking pool: a new stream is
    /// opened there, on the thread that runs `f` (each trip is a hand-off between threads, the
    /// largest cost of a small request).
    async fn run_from<R: Send + 'static>(
        &self,
        source: StreamSource,
        access: Access,
        hold: Hold,
        f: impl FnOnce(&mut Stream, &mut ResponseBudget) -> R + Send + 'static,
    ) -> Result<(Stream, R, ResponseBudget), RequestError> {
        let cancel = CancelOnDrop::new();
        let target = cancel.target();
        let mut budget = self.budgets.start(hold);
        let ran = blocking::run(move || -> Result<_, RequestError> {
            let mut stream = match source {
                StreamSource::Held(stream) => stream,
                StreamSource::Open(ns, origin) => Stream::open(ns, origin)?,
            };
            stream.attach(&target);
            stream.grant(access);
            let result = f(&mut stream, &mut budget);
            Ok((stream, result, budget))
        })
        .await??;
        cancel.disarm();
        Ok(ran)
    }

    /// Runs `f` on the stream a proxy client (a replica forwarding its writes) keeps under
    /// `key`, or on a new one. The stream stays under `key` while it holds a transaction, and
    /// is closed otherwise; an expired one is reported once, then the key starts afresh.
    pub async fn run_keyed<R: Send + 'static>(
        &self,
        ns: &NamespaceName,
        access: Access,
        key: &str,
        hold: Hold,
        f: impl FnOnce(&mut Stream, &mut ResponseBudget) -> R + Send + 'static,
    ) -> Result<(R, bool, ResponseBudget), RequestError> {
        let stream = match self.streams.take(key, ns) {
            Ok(stream) => stream,
            Err(RequestError::UnknownBaton) => self.stream_for(ns, None, true, None).await?.into_stream().await?,
            Err(e) => {
                self.streams.forget(key);
                return Err(e);
            }
        };
        let (stream, (result, in_transaction), budget) = self
            .run_held(stream, access, hold, move |stream, budget| {
                let result = f(stream, budget);
                let in_transaction = !stream.is_autocommit();
                if !in_transaction {
                    stream.close();
                }
                (result, in_transaction)
            })
            .await?;
        if in_transaction {
            self.streams.park_as(key, stream);
        }
        Ok((result, in_transaction, budget))
    }

    /// Rolls back and drops the stream a proxy client keeps under `key`, if any.
    pub fn discard_keyed(&self, ns: &NamespaceName, key: &str) {
        match self.streams.take(key, ns) {
            Ok(stream) => drop_off_runtime(vec![stream]),
            Err(_) => self.streams.forget(key),
        }
    }

    /// Opens a stream on `ns` that its transport holds between requests, counted against the
    /// server's and the namespace's stream bounds until the returned [`Held`] is dropped.
    pub async fn open_held(&self, ns: &NamespaceName) -> Result<(Stream, Held), RequestError> {
        let held = self.streams.hold(ns).map_err(|why| self.refused_room(ns, why))?;
        let stream = StreamSource::Open(self.store.get(ns).await?, None).into_stream().await?;
        Ok((stream, held))
    }

    /// Runs one statement on a fresh stream that is closed afterwards (Hrana v1 over HTTP).
    pub async fn execute_once(
        &self,
        ns: &NamespaceName,
        access: Access,
        stmt: Stmt,
        hold: Hold,
    ) -> Result<Answered<Result<StmtResult, StmtError>>, RequestError> {
        self.once(ns, access, hold, move |stream, budget| stream.execute(&stmt, budget)).await
    }

    /// Runs one batch on a fresh stream that is closed afterwards (Hrana v1 over HTTP).
    pub async fn batch_once(
        &self,
        ns: &NamespaceName,
        access: Access,
        batch: Batch,
        hold: Hold,
    ) -> Result<Answered<Result<BatchResult, StmtError>>, RequestError> {
        self.once(ns, access, hold, move |stream, budget| stream.run_batch(&batch, budget)).await
    }

    /// Runs `f` on a fresh stream on the blocking pool, then closes the stream.
    pub async fn once<R: Send + 'static>(
        &self,
        ns: &NamespaceName,
        access: Access,
        hold: Hold,
        f: impl FnOnce(&mut Stream, &mut ResponseBudget) -> R + Send + 'static,
    ) -> Result<Answered<R>, RequestError> {
        let source = StreamSource::Open(self.store.get(ns).await?, None);
        let (_, answer, budget) = self
            .run_from(source, access, hold, move |stream, budget| {
                let answer = f(stream, budget);
                stream.close();
                answer
            })
            .await?;
        Ok(Answered { answer, budget })
    }

    /// The stream of `baton`, or a new one to open. A new stream that will stay open (`parks`)
    /// must find room among the parked streams first, before it runs anything.
    async fn stream_for(&self, ns: &NamespaceName, baton: Option<&str>, parks: bool, origin: Option<u64>) -> Result<StreamSource, RequestError> {
        match baton {
            Some(baton) => self.streams.take(baton, ns).map(StreamSource::Held),
            None => {
                if parks {
                    self.check_room(ns, origin)?;
                }
                Ok(StreamSource::Open(self.store.get(ns).await?, origin))
            }
        }
    }

    fn check_room(&self, ns: &NamespaceName, origin: Option<u64>) -> Result<(), RequestError> {
        self.streams.check_room(ns, origin).map_err(|why| self.refused_room(ns, why))
    }

    fn refused_room(&self, ns: &NamespaceName, why: stream::ParkRefused) -> RequestError {
        match why {
            stream::ParkRefused::ServerFull => {
                self.hits.hit(Limit::Streams, format_args!("namespace {ns}"));
                RequestError::TooManyStreams
            }
            stream::ParkRefused::NamespaceFull => {
                self.hits.hit(Limit::StreamsPerNamespace, format_args!("namespace {ns}"));
                RequestError::TooManyNamespaceStreams
            }
            stream::ParkRefused::ConnectionFull => {
                self.hits.hit(Limit::StreamsPerConnection, format_args!("namespace {ns}"));
                RequestError::TooManyConnectionStreams
            }
        }
    }

    /// Expires idle streams until `stop` resolves; run as a background task.
    pub async fn reap_idle_streams(self, stop: impl std::future::Future<Output = ()>) {
        // Often enough that a transaction past its time limit lets the next writer in soon.
        let period = (self.streams.expiry() / 4).clamp(Duration::from_millis(10), Duration::from_millis(500));
        let mut ticker = tokio::time::interval(period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    let reaped = self.streams.reap();
                    if reaped.is_empty() {
                        continue;
                    }
                    // Once their connections are closed, the namespaces they held may close:
                    // in a task of its own, so a slow close never holds up the reaping.
                    let _ = blocking::run(move || drop(reaped)).await;
                    let store = self.store.clone();
                    tokio::spawn(async move { store.trim().await });
                }
                _ = &mut stop => break,
            }
        }
    }

    /// Rolls back and drops every parked stream (shutdown). Blocking work runs off the runtime.
    pub async fn close_all_streams(&self) {
        let streams = self.streams.drain();
        let _ = blocking::run(move || drop(streams)).await;
    }
}
