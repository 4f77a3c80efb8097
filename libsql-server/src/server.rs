//! A whole server: the namespace store, the user and admin APIs, their listeners, and the
//! order of a graceful shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::sync::{mpsc, watch};

use crate::auth::Auth;
use crate::config::Config;
use crate::hrana::budget::ResponseBudgets;
use crate::hrana::Hrana;
use crate::http::limits::RequestLimits;
use crate::metrics::Metrics;
use crate::namespace::{self, NamespaceStore, PrimaryLink};
use crate::grpc::{self, GrpcState};
use crate::net::{self, ConnectionLimits, Listener, Protocol};
use crate::http;

/// Admin requests and connections served at once.
const ADMIN_MAX_CONCURRENT: usize = 64;

/// Largest admin request body (configurations are small).
const ADMIN_MAX_BODY_SIZE: usize = 1 << 20;

/// Why a server could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Namespace(#[from] namespace::Error),
    #[error(transparent)]
    Auth(#[from] crate::auth::ConfigError),
    #[error("--primary-grpc-url {0:?} is not a URL")]
    PrimaryUrl(String),
}

/// How long a replica waits for its primary to accept a connection.
const PRIMARY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections a replica's followers spread over (a primary bounds the streams of one, and
/// each followed namespace keeps one open); opened as they are first used.
const PRIMARY_FOLLOWER_CHANNELS: usize = 8;

/// How often a replica pings an idle connection to its primary (a dead one is then noticed).
const PRIMARY_KEEP_ALIVE: Duration = Duration::from_secs(10);

pub struct Server {
    config: Config,
    auth: Arc<Auth>,
    /// The user API's bounds per request; its places for running requests are shared by
    /// HTTP, WebSocket and gRPC requests.
    limits: RequestLimits,
    /// Turns true when the server stops: what outlives a request (WebSockets) watches it.
    stop: watch::Sender<bool>,
    /// One place per WebSocket served at once; all of them free once every socket ended.
    websockets: Arc<tokio::sync::Semaphore>,
    hrana: Hrana,
    metrics: Arc<Metrics>,
    /// Raised once in-flight requests had their time: stops every statement still running.
    halt: Arc<AtomicBool>,
}

impl Server {
    /// Opens the data directory (creating it and the `default` namespace on first start).
    pub async fn open(config: Config) -> Result<Self, OpenError> {
        let metrics = Arc::new(Metrics::default());
        let auth = Arc::new(config.auth(metrics.hits.clone())?);
        let mut options = config.store_options();
        options.limits.hits = metrics.hits.clone();
        if let Some(url) = &config.primary_grpc_url {
            let endpoint = tonic::transport::Endpoint::from_shared(url.clone()).map_err(|_| OpenError::PrimaryUrl(url.clone()))?;
            let endpoint = endpoint.connect_timeout(PRIMARY_CONNECT_TIMEOUT).http2_keep_alive_interval(PRIMARY_KEEP_ALIVE);
            let channels = (0..PRIMARY_FOLLOWER_CHANNELS).map(|_| endpoint.connect_lazy()).collect();
            options.primary = Some(PrimaryLink { channels, writes: endpoint.connect_lazy(), token: config.primary_auth_token.clone() });
        }
        let halt = options.limits.halt.clone();
        let store = NamespaceStore::open(&config.db_path, options).await?;
        let budgets = ResponseBudgets::new(config.max_response_size, config.max_total_response_size, metrics.hits.clone());
        let hrana = Hrana::new(store, config.stream_limits(), budgets, metrics.hits.clone());
        let (stop, _) = watch::channel(false);
        let websockets = Arc::new(tokio::sync::Semaphore::new(config.max_websockets as usize));
        let mut limits = RequestLimits::new(
            config.max_body_size,
            config.body_read_timeout(),
            config.max_concurrent_requests as usize,
            metrics.hits.clone(),
        );
        limits.max_values = config.max_request_values as usize;
        metrics.watch_request_places(limits.running.clone(), config.max_concurrent_requests as usize);
        Ok(Server { config, auth, limits, stop, websockets, hrana, metrics, halt })
    }

    pub fn store(&self) -> &NamespaceStore {
        self.hrana.store()
    }

    /// The user API: Hrana over HTTP and WebSocket, sync v2, and the gRPC services as gRPC-web.
    pub fn user_router(&self, grpc: Router) -> Router {
        let websockets = http::user::WebSockets {
            places: self.websockets.clone(),
            limits: self.config.socket_limits(),
            max_message_size: self.config.max_body_size,
            max_write_buffer: self.config.max_response_size + (1 << 20),
            stop: self.stop.subscribe(),
        };
        http::user::router(self.hrana.clone(), self.auth.clone(), self.metrics.clone(), self.limits.clone(), websockets).merge(grpc)
    }

    /// The gRPC services (one router for both ports).
    fn grpc_router(&self) -> Router {
        grpc::router(Arc::new(GrpcState {
            hrana: self.hrana.clone(),
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
            running: self.limits.running.clone(),
            queue_wait: self.limits.queue_wait,
            streams: Arc::new(tokio::sync::Semaphore::new(self.config.max_replication_streams as usize)),
            max_message_size: self.config.max_body_size,
            body_read_timeout: self.config.body_read_timeout(),
            max_values: self.config.max_request_values as usize,
            stop: self.stop.subscribe(),
            session: uuid::Uuid::new_v4(),
            owners: std::collections::hash_map::RandomState::new(),
            // Under the connections' idle timeout: a waiting stream never idles one out.
            follow_idle: self.config.idle_connection_timeout() / 2,
            stall: self.config.header_read_timeout(),
            stream_expiry: std::time::Duration::from_secs(self.config.stream_expiry_s),
            session_idle: std::time::Duration::from_secs(self.config.websocket_idle_timeout_s),
        }))
    }

    /// The admin API has its own places, so a flood of user requests never locks the
    /// operator out.
    pub fn admin_router(&self) -> Router {
        let limits =
            RequestLimits::new(ADMIN_MAX_BODY_SIZE, self.config.body_read_timeout(), ADMIN_MAX_CONCURRENT, self.metrics.hits.clone());
        http::admin::router(self.hrana.clone(), self.metrics.clone(), self.config.admin_auth_key.clone(), limits)
    }

    fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.config.max_concurrent_connections as usize,
            header_read_timeout: self.config.header_read_timeout(),
            idle_timeout: self.config.idle_connection_timeout(),
            hits: self.metrics.hits.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then: stops accepting, lets in-flight requests finish
    /// (bounded by the shutdown timeout), rolls back idle streams, and closes every namespace
    /// after a checkpoint.
    pub async fn serve<U: Listener, A: Listener, G: Listener>(
        self,
        user: U,
        admin: Option<A>,
        grpc: Option<G>,
        shutdown: impl Future<Output = ()>,
    ) {
        let stop_tx = self.stop.clone();
        let stop_rx = stop_tx.subscribe();
        let (in_flight_tx, mut in_flight_rx) = mpsc::channel::<()>(1);

        let mut reaper_stop = stop_rx.clone();
        let reaper = tokio::spawn(self.hrana.clone().reap_idle_streams(async move {
            let _ = reaper_stop.changed().await;
        }));
        let grpc_router = self.grpc_router();
        let user_router = self.user_router(grpc_router.clone());
        let mut tasks = vec![tokio::spawn(net::serve(
            user,
            user_router,
            Protocol::Http1,
            self.connection_limits(),
            stop_rx.clone(),
            in_flight_tx.clone(),
        ))];
        if let Some(admin) = admin {
            let limits = ConnectionLimits { max_connections: ADMIN_MAX_CONCURRENT, ..self.connection_limits() };
            tasks.push(tokio::spawn(net::serve(admin, self.admin_router(), Protocol::Http1, limits, stop_rx.clone(), in_flight_tx.clone())));
        }
        if let Some(grpc) = grpc {
            let protocol = Protocol::Http2 { max_streams: self.config.max_streams_per_connection as u32 };
            tasks.push(tokio::spawn(net::serve(grpc, grpc_router, protocol, self.connection_limits(), stop_rx.clone(), in_flight_tx.clone())));
        }
        drop(in_flight_tx);
        if let Some(secs) = self.config.checkpoint_interval_s {
            let store = self.hrana.store().clone();
            every(Duration::from_secs(secs), stop_rx.clone(), move || {
                let store = store.clone();
                async move { store.checkpoint_loaded().await }
            });
        }
        let store = self.hrana.store().clone();
        every(IDLE_SWEEP_PERIOD, stop_rx.clone(), move || {
            let store = store.clone();
            async move { store.expire_idle_connections().await }
        });

        shutdown.await;
        tracing::info!("shutting down: no new connections, finishing in-flight requests");
        let _ = stop_tx.send(true);
        for task in tasks {
            let _ = task.await;
        }
        // Every connection task holds a sender; recv() yields None once all have finished.
        if tokio::time::timeout(self.config.shutdown_timeout(), in_flight_rx.recv()).await.is_err() {
            tracing::warn!("in-flight requests did not finish in time; stopping their statements");
        }
        self.halt.store(true, Ordering::Relaxed);
        // WebSockets close on the stop signal, rolling their streams back (a statement still
        // running was just stopped): every place free again means every socket has ended.
        let every_place = u32::try_from(self.config.max_websockets).unwrap_or(u32::MAX);
        if tokio::time::timeout(self.config.header_read_timeout(), self.websockets.acquire_many(every_place)).await.is_err() {
            tracing::warn!("WebSockets did not close in time");
        }
        let _ = reaper.await;
        self.hrana.close_all_streams().await;
        // Closing checkpoints every namespace; a namespace left open past the bound is not
        // lost: its sentinel stays, and its next open rolls the data file forward from the log.
        if tokio::time::timeout(self.config.shutdown_timeout(), self.hrana.store().shutdown()).await.is_err() {
            tracing::warn!("closing namespaces did not finish in time; those still open are recovered at their next open");
        }
        tracing::info!("shutdown complete");
    }
}

/// How often unused idle connections past each namespace's own are closed.
const IDLE_SWEEP_PERIOD: Duration = Duration::from_secs(15);

/// Runs `work` every `period` (the first time one period from now) until `stop` changes.
fn every<F, Fut>(period: Duration, mut stop: watch::Receiver<bool>, mut work: F)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(period);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = ticker.tick() => work().await,
                _ = stop.changed() => break,
            }
        }
    });
}
