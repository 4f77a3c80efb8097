//! Command-line flags and environment variables of `sqld`, named as the libSQL server names them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;

use crate::auth::{Auth, ConfigError as AuthConfigError};
use crate::database::{IdleBudget, Limits};
use crate::limit_hits::LimitHits;
use crate::ws::SocketLimits;

/// Cursors one WebSocket may hold open at once (each keeps its batch's answer, within the
/// response bounds, until fetched).
const MAX_CURSORS_PER_SOCKET: usize = 4;
use crate::hrana::StreamLimits;

use crate::namespace::StoreOptions;
use crate::replication::{LogSettings, RecoveryOptions};

/// The configuration of one server process. Every field has a working default, so `sqld` with
/// no flags serves the `default` database from `./data.sqld` on 127.0.0.1:8080.
#[derive(Parser, Debug, Clone)]
#[command(name = "sqld", version, about = "libSQL server: SQLite over HTTP (Hrana), with namespaces")]
pub struct Config {
    /// Directory that holds every database of this server (`dbs/<namespace>/data`).
    #[arg(long, env = "SQLD_DB_PATH", default_value = "data.sqld")]
    pub db_path: PathBuf,

    /// Address of the user API: Hrana over HTTP, `/health`, `/version`.
    #[arg(long, env = "SQLD_HTTP_LISTEN_ADDR", default_value = "127.0.0.1:8080")]
    pub http_listen_addr: SocketAddr,

    /// Address of the admin API (namespaces, configuration, `/metrics`). Off unless given.
    #[arg(long, env = "SQLD_ADMIN_LISTEN_ADDR")]
    pub admin_listen_addr: Option<SocketAddr>,

    /// Address of the gRPC API over HTTP/2 (`wal_log.ReplicationLog`, what libSQL server
    /// replicas pull from). Off unless given; the user port serves the same API as gRPC-web.
    #[arg(long, env = "SQLD_GRPC_LISTEN_ADDR")]
    pub grpc_listen_addr: Option<SocketAddr>,

    /// Replica mode: the gRPC address of the primary to follow (`http://host:port`, its
    /// `--grpc-listen-addr`). Every namespace is then copied from the primary on first use and
    /// followed; reads are served from the copy, writes and transactions go to the primary. A
    /// replica serves no replication of its own, so `--grpc-listen-addr` is refused with it.
    #[arg(long, env = "SQLD_PRIMARY_GRPC_URL", conflicts_with = "grpc_listen_addr")]
    pub primary_grpc_url: Option<String>,

    /// The credential (a JWT) a replica sends its primary with every call; the primary's
    /// grant for it is what the replica's clients may do there.
    #[arg(long, env = "SQLD_PRIMARY_AUTH_TOKEN", hide_env_values = true)]
    pub primary_auth_token: Option<String>,

    /// Bearer key every admin API request must carry (`Authorization: Bearer <key>`).
    #[arg(long, env = "LIBSQL_ADMIN_AUTH_KEY", hide_env_values = true)]
    pub admin_auth_key: Option<String>,

    /// File of Ed25519 public keys (PEM `PUBLIC KEY` blocks, or raw 32-byte keys in URL-safe
    /// base64, one a line) verifying users' JWTs: with it, every user request needs a token.
    #[arg(long, env = "SQLD_AUTH_JWT_KEY_FILE")]
    pub auth_jwt_key_file: Option<PathBuf>,

    /// The same keys as text (besides or instead of the file).
    #[arg(long, env = "SQLD_AUTH_JWT_KEY", hide_env_values = true)]
    pub auth_jwt_key: Option<String>,

    /// Legacy basic credential for the user API: `basic:<base64 of user:password>`.
    #[arg(long, env = "SQLD_HTTP_AUTH", hide_env_values = true)]
    pub http_auth: Option<String>,

    /// Serve many databases: a request's namespace comes from `x-namespace-bin`,
    /// `x-namespace` or the first label of `Host`. Without it every request uses `default`.
    #[arg(long, env = "SQLD_ENABLE_NAMESPACES")]
    pub enable_namespaces: bool,

    /// How many namespaces may be open at once; the least recently used idle one is closed
    /// cleanly when another must be opened.
    #[arg(long, env = "SQLD_MAX_ACTIVE_NAMESPACES", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_active_namespaces: u64,

    /// Size (MB) past which a namespace's replication log is retired into a snapshot.
    #[arg(long, env = "SQLD_MAX_LOG_SIZE", default_value_t = 200)]
    pub max_log_size: u64,

    /// Seconds after which a non-empty replication log is retired into a snapshot.
    #[arg(long, env = "SQLD_MAX_LOG_DURATION")]
    pub max_log_duration: Option<f64>,

    /// Seconds between checkpoints of every open namespace (SQLite's own autocheckpoint runs
    /// regardless).
    #[arg(long, env = "SQLD_CHECKPOINT_INTERVAL_S", value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_interval_s: Option<u64>,

    /// Largest HTTP request body the user API accepts, in bytes.
    #[arg(long, env = "SQLD_MAX_BODY_SIZE", default_value_t = 16 * 1024 * 1024)]
    pub max_body_size: usize,

    /// Requests served at once on the user API; one more waits up to 5 s, then gets 503.
    #[arg(long, env = "SQLD_MAX_CONCURRENT_REQUESTS", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_requests: u64,

    /// Connections open at once on the user API; one more is answered 503 and closed.
    #[arg(long, env = "SQLD_MAX_CONCURRENT_CONNECTIONS", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_concurrent_connections: u64,

    /// Seconds a client may take to send a request's head once it started it; also how long
    /// a client may leave its answer unread before it is disconnected.
    #[arg(long, env = "SQLD_HEADER_READ_TIMEOUT_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_read_timeout_s: u64,

    /// Seconds a connection with no request in flight stays open (idle keep-alive).
    #[arg(long, env = "SQLD_IDLE_CONNECTION_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_connection_timeout_s: u64,

    /// Seconds a client may take to send a request's body, once its head arrived.
    #[arg(long, env = "SQLD_BODY_READ_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_read_timeout_s: u64,

    /// Largest answer to one request (`10MB`, or a number of bytes); a larger one stops with
    /// `RESPONSE_TOO_LARGE`.
    #[arg(long, env = "SQLD_MAX_RESPONSE_SIZE", default_value = "10MB", value_parser = size_arg)]
    pub max_response_size: usize,

    /// Memory one statement may take from SQLite (`128MB`, or a number of bytes; 0: no
    /// limit); a statement that needs more stops with `MEMORY_LIMIT`.
    #[arg(long, env = "SQLD_MAX_STATEMENT_MEMORY", default_value = "128MB", value_parser = size_arg)]
    pub max_statement_memory: usize,

    /// Idle SQLite connections kept open for reuse across all namespaces, beyond the 8 each
    /// namespace keeps (a namespace keeps at most 64): each holds up to its page cache (about
    /// 2 MB). Too few, and a namespace with more requests at once than it keeps opens and
    /// closes a connection for each.
    #[arg(long, env = "SQLD_MAX_IDLE_CONNECTIONS", default_value_t = crate::database::DEFAULT_IDLE_BUDGET)]
    pub max_idle_connections: usize,

    /// Largest total of the answers being built or sent at once; past it, `RESPONSES_EXHAUSTED`.
    #[arg(long, env = "SQLD_MAX_TOTAL_RESPONSE_SIZE", default_value = "32MB", value_parser = size_arg)]
    pub max_total_response_size: usize,

    /// Hrana WebSockets served at once; one more is answered 503.
    #[arg(long, env = "SQLD_MAX_WEBSOCKETS", default_value_t = 128, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_websockets: u64,

    /// Most values one Hrana request (an HTTP body, a WebSocket message) may hold: JSON
    /// scalars, arrays and objects, or protobuf fields. Checked before decoding, so a small
    /// body never decodes into a large request; one past it is refused (413).
    #[arg(long, env = "SQLD_MAX_REQUEST_VALUES", default_value_t = 262_144, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_request_values: u64,

    /// Replication streams (gRPC `LogEntries` and `Snapshot`) served at once, over both ports;
    /// one more is refused `RESOURCE_EXHAUSTED`.
    #[arg(long, env = "SQLD_MAX_REPLICATION_STREAMS", default_value_t = 256, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_replication_streams: u64,

    /// Seconds a Hrana WebSocket with no message from its client stays open.
    #[arg(long, env = "SQLD_WEBSOCKET_IDLE_TIMEOUT_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub websocket_idle_timeout_s: u64,

    /// Seconds an idle Hrana stream (an interactive transaction's baton) lives before it is
    /// rolled back and its baton refused.
    #[arg(long, env = "SQLD_STREAM_EXPIRY_S", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_expiry_s: u64,

    /// How many Hrana streams (batons) may wait between requests, over all namespaces.
    #[arg(long, env = "SQLD_MAX_STREAMS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_streams: u64,

    /// How many Hrana streams may wait between requests for one namespace.
    #[arg(long, env = "SQLD_MAX_STREAMS_PER_NAMESPACE", default_value_t = 250, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_streams_per_namespace: u64,

    /// How many Hrana streams opened over one client connection may wait between requests.
    #[arg(long, env = "SQLD_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_streams_per_connection: u64,

    /// Milliseconds a writer waits for its namespace's write lock before it gets SQLITE_BUSY.
    #[arg(long, env = "SQLD_WRITE_LOCK_TIMEOUT_MS", default_value_t = 5000)]
    pub write_lock_timeout_ms: u64,

    /// Milliseconds one statement may run before it is stopped (0: no limit).
    #[arg(long, env = "SQLD_STATEMENT_TIMEOUT_MS", default_value_t = 30_000)]
    pub statement_timeout_ms: u64,

    /// Seconds a write transaction may hold its namespace's write lock before it is rolled
    /// back, for namespaces whose configuration sets no `txn_timeout_s` (0: no limit).
    #[arg(long, env = "SQLD_TXN_TIMEOUT_S", default_value_t = 5)]
    pub txn_timeout_s: u64,

    /// Seconds a graceful shutdown waits for in-flight requests before it closes anyway.
    #[arg(long, env = "SQLD_SHUTDOWN_TIMEOUT_S", alias = "shutdown-timeout", default_value_t = 10)]
    pub shutdown_timeout_s: u64,
}

impl Config {
    /// A configuration with every default, rooted at `db_path`: what tests and benches start from.
    pub fn with_db_path(db_path: impl Into<PathBuf>) -> Self {
        let mut config = Config::parse_from(["sqld"]);
        config.db_path = db_path.into();
        config
    }

    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            primary: None,
            namespaces_enabled: self.enable_namespaces,
            max_active: self.max_active_namespaces as usize,
            limits: Limits {
                write_lock_timeout: self.write_lock_timeout(),
                statement_timeout: nonzero(Duration::from_millis(self.statement_timeout_ms)),
                transaction_timeout: nonzero(Duration::from_secs(self.txn_timeout_s)),
                max_value_size: self.max_body_size.max(self.max_response_size),
                statement_memory: (self.max_statement_memory > 0).then_some(self.max_statement_memory as u64),
                halt: Arc::new(AtomicBool::new(false)),
                hits: Arc::default(),
                idle_connections: IdleBudget::new(self.max_idle_connections),
            },
            log: LogSettings::from_flags(self.max_log_size, self.max_log_duration),
            recovery: RecoveryOptions::from_env(),
        }
    }

    /// Users' authentication: the keys of the file and of `--auth-jwt-key`, and `--http-auth`.
    pub fn auth(&self, hits: Arc<LimitHits>) -> Result<Auth, AuthConfigError> {
        let mut keys = self.auth_jwt_key.clone();
        if let Some(path) = &self.auth_jwt_key_file {
            let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::KeyFile { path: path.clone(), source })?;
            keys = Some(keys.map_or(text.clone(), |k| format!("{k}\n{text}")));
        }
        Auth::new(keys.as_deref(), self.http_auth.as_deref(), hits)
    }

    /// The bounds of each Hrana WebSocket.
    pub fn socket_limits(&self) -> SocketLimits {
        SocketLimits {
            max_streams: self.max_streams_per_connection as usize,
            max_cursors: MAX_CURSORS_PER_SOCKET,
            idle_timeout: Duration::from_secs(self.websocket_idle_timeout_s),
            stream_expiry: Duration::from_secs(self.stream_expiry_s),
            send_timeout: self.header_read_timeout(),
            max_values: self.max_request_values as usize,
        }
    }

    pub fn stream_limits(&self) -> StreamLimits {
        StreamLimits {
            expiry: Duration::from_secs(self.stream_expiry_s),
            max_streams: self.max_streams as usize,
            max_per_namespace: self.max_streams_per_namespace as usize,
            max_per_connection: self.max_streams_per_connection as usize,
        }
    }

    pub fn write_lock_timeout(&self) -> Duration {
        Duration::from_millis(self.write_lock_timeout_ms)
    }

    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_secs(self.header_read_timeout_s)
    }

    pub fn idle_connection_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_connection_timeout_s)
    }

    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_secs(self.body_read_timeout_s)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_s)
    }
}

/// A limit of zero means no limit.
fn nonzero(limit: Duration) -> Option<Duration> {
    (!limit.is_zero()).then_some(limit)
}

/// A size in bytes, given as a number or with a unit (`10MB`, `512kib`, `1G`).
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().ok()?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "kib" | "k" => 1 << 10,
        "mb" => 1_000_000,
        "mib" | "m" => 1 << 20,
        "gb" => 1_000_000_000,
        "gib" | "g" => 1 << 30,
        "tb" => 1_000_000_000_000,
        "tib" | "t" => 1 << 40,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

fn size_arg(text: &str) -> Result<usize, String> {
    parse_size(text).and_then(|n| usize::try_from(n).ok()).ok_or_else(|| format!("{text:?} is not a size (a number of bytes, or with a unit: 10MB)"))
}
