//! Listeners and the HTTP serving loop. The server accepts connections from anything that
//! yields async byte streams, so tests run it over turmoil's simulated network unchanged.

use std::future::Future;
use std::io;
use std::time::Duration;

use axum::Router;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

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
pub async fn serve(mut listener: impl Listener, router: Router, mut shutdown: watch::Receiver<bool>, in_flight: mpsc::Sender<()>) {
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
        let router = router.clone();
        let mut shutdown = shutdown.clone();
        let in_flight = in_flight.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::Http::new().serve_connection(io, router).with_upgrades();
            tokio::pin!(conn);
            let result = tokio::select! {
                result = conn.as_mut() => result,
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
            drop(in_flight);
        });
    }
}
