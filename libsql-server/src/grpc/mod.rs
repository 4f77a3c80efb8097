//! gRPC, a transport beside `http` and `ws`: the replication log service replicas pull from
//! (`wal_log.ReplicationLog`, see [`replication_log`]) and the writes they forward (`proxy.Proxy`,
//! see [`proxy`]).
//!
//! One router serves it both ways: over HTTP/2 on `--grpc-listen-addr` (libSQL server replicas)
//! and as gRPC-web over HTTP/1.1 on the user port (embedded replicas of the `libsql` crate and
//! of the clients built on it, which speak nothing else). Every call names its namespace in
//! `x-namespace-bin` (the `default` namespace without it) and carries its credential in
//! `x-authorization` (gRPC-web) or `authorization`; both go through [`crate::auth`] as every
//! other transport's do. Calls take a place among the running requests as HTTP and WebSocket
//! requests do; the long-lived streams (`LogEntries`, `Snapshot`) take one of
//! `--max-replication-streams` instead. Every error becomes a status in [`status`].

mod admit;
mod proxy;
mod replication_log;
mod status;
mod stream_exec;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use libsql_replication::rpc::proxy::proxy_server::ProxyServer;
use libsql_replication::rpc::replication::replication_log_server::ReplicationLogServer;
use libsql_replication::rpc::replication::{BoxStream, NAMESPACE_METADATA_KEY};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tonic::metadata::MetadataMap;
use tonic::Status;
use tower::Layer;
use uuid::Uuid;

use crate::auth::{Access, Auth, Credential};
use crate::hrana::{shape, Hrana};
use crate::limit_hits::{take_place, Limit};
use crate::metrics::Metrics;
use crate::namespace::NamespaceName;

pub use status::StatusOf;

/// What every gRPC service of a server shares.
pub struct GrpcState {
    pub hrana: Hrana,
    pub auth: Arc<Auth>,
    pub metrics: Arc<Metrics>,
    /// The places of the requests running at once, shared with HTTP and WebSocket requests.
    pub running: Arc<Semaphore>,
    pub queue_wait: Duration,
    /// One place per replication stream served at once.
    pub streams: Arc<Semaphore>,
    /// Largest request message a client may send (the request body bound), and how long a
    /// unary call's message may take to arrive.
    pub max_message_size: usize,
    pub body_read_timeout: Duration,
    /// Most values one message may hold (`--max-request-values`, see `hrana::shape`).
    pub max_values: usize,
    /// Turns true when the server stops: streams end.
    pub stop: watch::Receiver<bool>,
    /// This process's session: session tokens from before a restart are refused.
    pub session: Uuid,
    /// Random keys for [`Caller::owner`].
    pub owners: std::collections::hash_map::RandomState,
    /// How long a `LogEntries` stream waits for a new commit before it ends.
    pub follow_idle: Duration,
    /// How long a streamed answer may wait for the client to take it.
    pub stall: Duration,
    /// How long a `StreamExec` session waits for a request, inside a transaction and outside.
    pub stream_expiry: Duration,
    pub session_idle: Duration,
}

/// The gRPC services, for the user port (as gRPC-web) and the gRPC port (HTTP/2).
pub fn router(state: Arc<GrpcState>) -> Router {
    let log = ReplicationLogServer::new(replication_log::ReplicationLogService::new(state.clone()))
        .max_decoding_message_size(state.max_message_size);
    let proxy = ProxyServer::new(proxy::ProxyService::new(state.clone())).max_decoding_message_size(state.max_message_size);
    let (timeout, hits) = (state.body_read_timeout, state.metrics.hits.clone());
    // A unary call's message must arrive within the body read timeout, as an HTTP body must:
    // a client trickling it would otherwise hold its connection for good. (`StreamExec`'s
    // messages are bounded by the session's idle times instead.)
    let deadline = tower::util::MapRequestLayer::new(move |request: http::Request<hyper::Body>| {
        if request.uri().path().ends_with("/StreamExec") {
            return request;
        }
        let (hits, path) = (hits.clone(), request.uri().path().to_owned());
        request.map(|body| with_deadline(body, timeout, move || hits.hit(Limit::BodyTimeout, format_args!("gRPC {path}"))))
    });
    // Each message is counted before tonic decodes it (see `hrana::shape`): a small message
    // must not decode into a large one (an empty program step is 2 bytes, decoded ~130).
    let (max_values, max_message, hits) = (state.max_values, state.max_message_size, state.metrics.hits.clone());
    let checked = tower::util::MapRequestLayer::new(move |request: http::Request<hyper::Body>| {
        let (hits, path) = (hits.clone(), request.uri().path().to_owned());
        let refused = move || hits.hit(Limit::RequestValues, format_args!("gRPC {path}"));
        request.map(|body| checked_messages(body, max_values, max_message, refused))
    });
    let web = tonic_web::GrpcWebLayer::new();
    let log = web.layer(admit::Admit::new(checked.clone().layer(log), state.clone()));
    let proxy = web.layer(admit::Admit::new(checked.layer(proxy), state));
    Router::new()
        .route_service("/wal_log.ReplicationLog/*method", deadline.clone().layer(log))
        .route_service("/proxy.Proxy/*method", deadline.layer(proxy))
}

/// `body`'s gRPC messages (a flag byte, a 4-byte big-endian length, the message), each
/// passed on once [`shape::check_protobuf`] accepted it; the body fails at the first one
/// that holds more than `max_values` values or is not a message. A message declared larger
/// than `max_message` is passed on unread (the decoder refuses it by its length).
fn checked_messages(body: hyper::Body, max_values: usize, max_message: usize, refused: impl Fn() + Send + 'static) -> hyper::Body {
    use bytes::BytesMut;
    use http_body::Body as _;
    struct Reading {
        body: hyper::Body,
        buffer: BytesMut,
        /// Past a message too large to check: the rest is passed on as it comes.
        unchecked: bool,
    }
    let start = Reading { body, buffer: BytesMut::new(), unchecked: false };
    let chunks = futures::stream::unfold(Some((start, refused)), move |state| async move {
        let (mut reading, refused) = state?;
        loop {
            if reading.unchecked && !reading.buffer.is_empty() {
                let rest = reading.buffer.split().freeze();
                return Some((Ok(rest), Some((reading, refused))));
            }
            if !reading.unchecked && reading.buffer.len() >= 5 {
                let len = u32::from_be_bytes(reading.buffer[1..5].try_into().expect("4 bytes")) as usize;
                if len > max_message {
                    reading.unchecked = true;
                    continue;
                }
                if reading.buffer.len() >= 5 + len {
                    let frame = reading.buffer.split_to(5 + len).freeze();
                    // Compressed messages are not accepted by the services: the decoder
                    // refuses them.
                    if frame[0] & 1 == 0 {
                        if let Err(e) = shape::check_protobuf(&frame[5..], max_values) {
                            if let shape::ProtobufRefused::TooManyValues(_) = e {
                                refused();
                            }
                            return Some((Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)), None));
                        }
                    }
                    return Some((Ok(frame), Some((reading, refused))));
                }
            }
            match reading.body.data().await {
                Some(Ok(chunk)) => reading.buffer.extend_from_slice(&chunk),
                Some(Err(e)) => return Some((Err(std::io::Error::other(e)), None)),
                // A truncated message is passed on as it is: the decoder reports it.
                None if !reading.buffer.is_empty() => {
                    let rest = reading.buffer.split().freeze();
                    return Some((Ok(rest), None));
                }
                None => return None,
            }
        }
    });
    hyper::Body::wrap_stream(chunks)
}

/// `body`, failing once `timeout` has passed before its end (`on_timeout` is called then).
fn with_deadline(body: hyper::Body, timeout: Duration, on_timeout: impl FnOnce() + Send + 'static) -> hyper::Body {
    use http_body::Body as _;
    let deadline = tokio::time::Instant::now() + timeout;
    let chunks = futures::stream::unfold(Some((body, on_timeout)), move |state| async move {
        let (mut body, on_timeout) = state?;
        match tokio::time::timeout_at(deadline, body.data()).await {
            Ok(Some(chunk)) => Some((chunk.map_err(std::io::Error::other), Some((body, on_timeout)))),
            Ok(None) => None,
            Err(_) => {
                on_timeout();
                let message = format!("the request's message did not arrive within {timeout:?}");
                Some((Err(std::io::Error::new(std::io::ErrorKind::TimedOut, message)), None))
            }
        }
    });
    hyper::Body::wrap_stream(chunks)
}

/// A stream of what `rx` receives.
fn received<T: Send + 'static>(rx: tokio::sync::mpsc::Receiver<T>) -> BoxStream<'static, T> {
    Box::pin(futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) }))
}

/// Serves `stream` from a task of its own, which ends it once the client has left an item
/// unread for `stall`: a replica that stops reading (over HTTP/2, a zero window stops it
/// without the connection looking stalled) does not keep the stream's place, or its timers
/// from running, for good.
fn pumped<T: Send + 'static>(stream: impl futures::Stream<Item = T> + Send + 'static, stall: Duration) -> BoxStream<'static, T> {
    use futures::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            if !matches!(tokio::time::timeout(stall, tx.send(item)).await, Ok(Ok(()))) {
                break;
            }
        }
    });
    received(rx)
}

/// Whose call this is: its namespace, and what its credential grants there.
#[derive(Clone)]
pub struct Caller {
    pub ns: NamespaceName,
    pub access: Access,
    /// A keyed hash of the credential it came with (none counts too): what a proxy client's
    /// transaction belongs to, so another caller cannot use or end it by its client_id.
    pub owner: u64,
}

impl GrpcState {
    /// The namespace a call names and the access its credential grants there.
    pub fn admit(&self, metadata: &MetadataMap) -> Result<Caller, Status> {
        let ns = self.namespace(metadata)?;
        if self.hrana.store().is_replica() {
            // Replicas and their writes are served by the primary.
            return Err(crate::namespace::Error::NotPrimary(ns).status());
        }
        let credential = metadata.get("x-authorization").or_else(|| metadata.get("authorization")).map(|value| value.as_bytes());
        let owner = std::hash::BuildHasher::hash_one(&self.owners, credential);
        let access =
            self.auth.check(Credential::Header(credential), &ns, self.hrana.store().jwt_key(&ns).as_deref()).map_err(|e| e.status())?;
        Ok(Caller { ns, access, owner })
    }

    fn namespace(&self, metadata: &MetadataMap) -> Result<NamespaceName, Status> {
        if !self.hrana.store().namespaces_enabled() {
            return Ok(NamespaceName::default_namespace());
        }
        let Some(value) = metadata.get_bin(NAMESPACE_METADATA_KEY) else {
            return Ok(NamespaceName::default_namespace());
        };
        let bytes = value.to_bytes().map_err(|_| Status::invalid_argument(format!("{NAMESPACE_METADATA_KEY} is not base64")))?;
        let name =
            String::from_utf8(bytes.to_vec()).map_err(|_| Status::invalid_argument(format!("{NAMESPACE_METADATA_KEY} is not UTF-8")))?;
        NamespaceName::new(name).map_err(|e| Status::invalid_argument(e.to_string()))
    }

    /// A place among the requests running at once, after a bounded wait.
    pub async fn place(&self, ns: &NamespaceName, call: &str) -> Result<OwnedSemaphorePermit, Status> {
        match take_place(&self.running, self.queue_wait).await {
            Some(place) => Ok(place),
            None => {
                self.metrics.hits.hit(Limit::Requests, format_args!("namespace {ns}: gRPC {call}"));
                Err(Status::resource_exhausted("too many requests are running; retry later"))
            }
        }
    }

    /// A place among the replication streams served at once; none is waited for.
    pub fn stream_place(&self, ns: &NamespaceName, call: &str) -> Result<OwnedSemaphorePermit, Status> {
        self.streams.clone().try_acquire_owned().map_err(|_| {
            self.metrics.hits.hit(Limit::ReplicationStreams, format_args!("namespace {ns}: gRPC {call}"));
            Status::resource_exhausted("too many replication streams are open; retry later")
        })
    }
}
