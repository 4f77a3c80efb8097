//! Listeners and the HTTP serving loop. The server accepts connections from anything that
//! yields async byte streams, so tests run it over turmoil's simulated network unchanged.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch, Semaphore};

use tokio::time::Instant;
use tower::Service;

use crate::limit_hits::{Limit, LimitHits};

/// Bounds on the connections of one listener.
#[derive(Clone)]
pub struct ConnectionLimits {
    /// Connections served at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// How long a client may take to send a request's head once it started it (slowloris).
    pub header_read_timeout: Duration,
    /// How long a connection with no request in flight stays open (idle keep-alive), and how
    /// long a closing connection may take to deliver its last answer (a client that does not
    /// read).
    pub idle_timeout: Duration,
    pub hits: Arc<LimitHits>,
}

/// The HTTP a listener speaks.
#[derive(Debug, Clone, Copy)]
pub enum Protocol {
    /// HTTP/1.1 only (the user and admin ports): no client speaks HTTP/2 to them, and its
    /// streams would slip past the per-connection limits.
    Http1,
    /// HTTP/2 only (the gRPC port), at most `max_streams` requests at once per connection.
    Http2 { max_streams: u32 },
}

/// A source of client connections.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listener for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }
}

/// Serves `router` on connections from `listener` until `shutdown` turns true, then lets each
/// open connection finish its in-flight request. `in_flight` is held by every connection task,
/// so the caller knows when all have ended.
pub async fn serve(
    mut listener: impl Listener,
    router: Router,
    protocol: Protocol,
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
    in_flight: mpsc::Sender<()>,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections));
    // Refusals in progress are bounded too: past them, a connection is simply closed.
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS));
    loop {
        let io = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(io) => io,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let Ok(place) = places.clone().try_acquire_owned() else {
            limits.hits.hit(Limit::Connections, format_args!("{} connections open", limits.max_connections));
            if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(io).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let router = router.clone();
        let mut shutdown = shutdown.clone();
        let in_flight = in_flight.clone();
        let (header_read_timeout, idle_timeout, hits) = (limits.header_read_timeout, limits.idle_timeout, limits.hits.clone());
        tokio::spawn(async move {
            let _place = place;
            let activity = Arc::new(Activity::new(matches!(protocol, Protocol::Http1)));
            let keep_alive = matches!(protocol, Protocol::Http1).then(|| keep_alive_header(idle_timeout)).flatten();
            let id = ConnectionId(NEXT_CONNECTION.fetch_add(1, Ordering::Relaxed));
            let service = Tracked { router, activity: activity.clone(), id, keep_alive };
            let io = Watched { io, activity: activity.clone() };
            let mut http = hyper::server::conn::Http::new();
            match protocol {
                // The head's time limit is the watchdog's (hyper's would run from the end of
                // the previous answer, so it closed idle keep-alive connections).
                Protocol::Http1 => http.http1_only(true),
                Protocol::Http2 { max_streams } => http.http2_only(true).http2_max_concurrent_streams(max_streams),
            };
            let conn = http.serve_connection(io, service).with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => Some(result),
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    Some(conn.await)
                }
                why = activity.should_close(idle_timeout, header_read_timeout) => {
                    match why {
                        Closing::StalledReader => {
                            hits.hit(Limit::StalledReader, format_args!("a client left its answer unread for {header_read_timeout:?}"))
                        }
                        Closing::SlowHead => tracing::debug!("a client took over {header_read_timeout:?} to send a request's head"),
                        Closing::Idle => {}
                    }
                    // An idle connection closes at once; one stuck on a client that does not
                    // read gets a moment, then is dropped (its answer's budget with it).
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(CLOSE_GRACE, conn.as_mut()).await.ok()
                }
            };
            let result = result.unwrap_or(Ok(()));
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(in_flight);
        });
    }
}

/// Numbers client connections, for `ConnectionId`.
static NEXT_CONNECTION: AtomicU64 = AtomicU64::new(0);

/// Connections being answered 503 at once.
const MAX_REFUSALS: usize = 64;

/// How long a connection being closed may take to finish what it was writing.
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Answers a connection over the limit with a 503 JSON error and closes it.
async fn refuse(mut io: impl AsyncRead + AsyncWrite + Unpin) {
    let body =
        r#"{"error":"too many connections; retry later","message":"too many connections; retry later","code":"CONNECTIONS_EXHAUSTED"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    // Written before the request is read; the request is then drained (bounded), so closing
    // with unread bytes does not reset the connection before the client reads the answer.
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        io.write_all(answer.as_bytes()).await?;
        io.shutdown().await?;
        let mut sink = [0u8; 1024];
        while io.read(&mut sink).await? > 0 {}
        Ok::<_, io::Error>(())
    })
    .await;
}

/// How long a refused connection may take to accept its 503.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Which client connection a request came over (a request extension), so what it opens can
/// count against that connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionId(pub u64);

/// The router of one connection, marking each request in flight until its answer is ready.
struct Tracked {
    router: Router,
    activity: Arc<Activity>,
    id: ConnectionId,
    /// HTTP/1: the `keep-alive` header every HTTP/1.1 answer but a 101 carries (hyper adds
    /// `connection: close` where it will close; clients then ignore this one).
    keep_alive: Option<http::HeaderValue>,
}

/// `keep-alive: timeout=N`: how long the client may leave the connection idle and still
/// reuse it. One second less than the server waits, so a client that honours it (Node's
/// fetch does) never sends a request on a connection the server is closing; none when that
/// leaves no time.
fn keep_alive_header(idle_timeout: Duration) -> Option<http::HeaderValue> {
    let seconds = idle_timeout.as_secs().checked_sub(1).filter(|&s| s > 0)?;
    Some(http::HeaderValue::from_str(&format!("timeout={seconds}")).expect("a valid header value"))
}

impl Service<hyper::Request<hyper::Body>> for Tracked {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.router.poll_ready(cx)
    }

    fn call(&mut self, mut request: hyper::Request<hyper::Body>) -> Self::Future {
        request.extensions_mut().insert(self.id);
        let in_flight = self.activity.begin();
        let keep_alive = self.keep_alive.clone().filter(|_| request.version() == http::Version::HTTP_11);
        let answer = self.router.call(request);
        Box::pin(async move {
            let Ok(mut response) = answer.await;
            if let Some(value) = keep_alive.filter(|_| response.status() != http::StatusCode::SWITCHING_PROTOCOLS) {
                response.headers_mut().insert(http::header::HeaderName::from_static("keep-alive"), value);
            }
            // In flight until its body is sent (or dropped): a streamed answer (a gRPC stream,
            // a long download) is not an idle connection, and bytes read meanwhile (a
            // pipelined request) do not start a head's timer.
            Ok(response.map(|body| axum::body::boxed(Answering { body, in_flight: Some(in_flight) })))
        })
    }
}

/// An answer's body, holding its request in flight until the body ends or is dropped.
struct Answering<B> {
    body: B,
    in_flight: Option<InFlight>,
}

impl<B: http_body::Body + Unpin> http_body::Body for Answering<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_data(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Self::Data, Self::Error>>> {
        let poll = Pin::new(&mut self.body).poll_data(cx);
        if let Poll::Ready(None) = poll {
            self.in_flight = None;
        }
        poll
    }

    fn poll_trailers(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<Option<http::HeaderMap>, Self::Error>> {
        let poll = Pin::new(&mut self.body).poll_trailers(cx);
        if poll.is_ready() {
            self.in_flight = None;
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Whether a connection has a request in flight, and since when it has had none.
struct Activity {
    state: std::sync::Mutex<ActivityState>,
    /// HTTP/1: a request's head is timed from its first byte.
    times_heads: bool,
}

struct ActivityState {
    /// Requests in flight, and since when there has been none.
    running: usize,
    idle_since: Instant,
    /// Since when a write to the client has been waiting for it to read.
    write_blocked_since: Option<Instant>,
    /// When the first bytes of a request arrived that has not started yet (its head is still
    /// coming).
    head_since: Option<Instant>,
}

/// Why a connection is closed by its watchdog.
#[derive(Debug, PartialEq, Eq)]
enum Closing {
    /// No request in flight for the idle timeout.
    Idle,
    /// An answer the client has not read for the header-read timeout.
    StalledReader,
    /// A request's head not complete within the header-read timeout of its first byte.
    SlowHead,
}

/// Marks a request in flight until dropped.
struct InFlight(Arc<Activity>);

impl Activity {
    fn new(times_heads: bool) -> Self {
        let state = ActivityState { running: 0, idle_since: Instant::now(), write_blocked_since: None, head_since: None };
        Activity { state: std::sync::Mutex::new(state), times_heads }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ActivityState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        let mut state = self.state();
        state.running += 1;
        state.head_since = None;
        InFlight(self.clone())
    }

    /// Bytes came from the client: with no request in flight, a request's head has begun.
    fn read_bytes(&self) {
        if self.times_heads {
            let mut state = self.state();
            if state.running == 0 {
                state.head_since.get_or_insert_with(Instant::now);
            }
        }
    }

    fn write_blocked(&self) {
        self.state().write_blocked_since.get_or_insert_with(Instant::now);
    }

    /// The client took what was written (or there was nothing to take); with `wrote`, bytes
    /// went out, which counts as activity: a slow download is not an idle connection. (A
    /// flush with nothing to send is not: the watchdog's own wake-ups poll the connection,
    /// which flushes.)
    fn write_moved(&self, wrote: bool) {
        let mut state = self.state();
        state.write_blocked_since = None;
        if wrote {
            state.idle_since = Instant::now();
        }
    }

    /// Resolves once the connection should close: no request in flight for `idle`, an answer
    /// the client has not read for `stall`, or a request's head still incomplete `stall` after
    /// its first byte (checked at least every `stall`).
    async fn should_close(&self, idle: Duration, stall: Duration) -> Closing {
        loop {
            let now = Instant::now();
            let (idle_until, stall_until, head_until) = {
                let state = self.state();
                let idle_until = if state.running > 0 { now + idle } else { state.idle_since + idle };
                (idle_until, state.write_blocked_since.map(|since| since + stall), state.head_since.map(|since| since + stall))
            };
            if stall_until.is_some_and(|t| now >= t) {
                return Closing::StalledReader;
            }
            if head_until.is_some_and(|t| now >= t) {
                return Closing::SlowHead;
            }
            if now >= idle_until {
                return Closing::Idle;
            }
            let next = [stall_until, head_until].into_iter().flatten().fold(idle_until, Instant::min);
            tokio::time::sleep_until(next.min(now + stall)).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.running -= 1;
        state.idle_since = Instant::now();
    }
}

/// A client connection whose reads and writes are watched: bytes that start a request, and a
/// write that waits on the client (it does not read its answer), are noted in the
/// connection's activity.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    /// Notes a write's or a flush's outcome; `wrote` tells whether bytes went out.
    fn note<R>(&self, poll: Poll<io::Result<R>>, wrote: impl FnOnce(&R) -> bool) -> Poll<io::Result<R>> {
        match &poll {
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(Ok(done)) => self.activity.write_moved(wrote(done)),
            Poll::Ready(Err(_)) => self.activity.write_moved(false),
        }
        poll
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_bytes();
        }
        poll
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(poll, |&n| n > 0)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.note(poll, |&n| n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.note(poll, |()| false)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
