//! Listeners and the HTTP serving loop. The server accepts connections from anything that
//! yields async byte streams, so tests run it over turmoil's simulated network unchanged.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    limits: ConnectionLimits,
    mut shutdown: watch::Receiver<bool>,
    in_flight: mpsc::Sender<()>,
) {
    let places = Arc::new(Semaphore::new(limits.max_connections));
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
            tokio::spawn(refuse(io));
            continue;
        };
        let router = router.clone();
        let mut shutdown = shutdown.clone();
        let in_flight = in_flight.clone();
        let (header_read_timeout, idle_timeout) = (limits.header_read_timeout, limits.idle_timeout);
        tokio::spawn(async move {
            let _place = place;
            let activity = Arc::new(Activity::new());
            let service = Tracked { router, activity: activity.clone() };
            let conn = hyper::server::conn::Http::new()
                .http1_header_read_timeout(header_read_timeout)
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => Some(result),
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    Some(conn.await)
                }
                _ = activity.idle(idle_timeout) => {
                    // Lets an answer still being written go out, but not forever.
                    conn.as_mut().graceful_shutdown();
                    tokio::time::timeout(idle_timeout, conn.as_mut()).await.ok()
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

/// The router of one connection, marking each request in flight until its answer is ready.
struct Tracked {
    router: Router,
    activity: Arc<Activity>,
}

impl Service<hyper::Request<hyper::Body>> for Tracked {
    type Response = axum::response::Response;
    type Error = std::convert::Infallible;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.router.poll_ready(cx)
    }

    fn call(&mut self, request: hyper::Request<hyper::Body>) -> Self::Future {
        let in_flight = self.activity.begin();
        let answer = self.router.call(request);
        Box::pin(async move {
            let answer = answer.await;
            drop(in_flight);
            answer
        })
    }
}

/// Whether a connection has a request in flight, and since when it has had none.
struct Activity {
    state: std::sync::Mutex<(usize, Instant)>,
}

/// Marks a request in flight until dropped.
struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Self {
        Activity { state: std::sync::Mutex::new((0, Instant::now())) }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        InFlight(self.clone())
    }

    /// Resolves once the connection has had no request in flight for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let (running, since) = *self.state.lock().unwrap_or_else(|e| e.into_inner());
            let until = if running > 0 { Instant::now() + timeout } else { since + timeout };
            if running == 0 && Instant::now() >= until {
                return;
            }
            tokio::time::sleep_until(until).await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        state.0 -= 1;
        state.1 = Instant::now();
    }
}
