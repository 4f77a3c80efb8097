//! Hrana over WebSocket (`hrana3-protobuf`; `hrana3`, `hrana2`, `hrana1` in JSON): a transport
//! beside `http`. One socket carries many streams, each on a connection of its own through the same
//! `hrana` layer as HTTP (write gate, authorizer, limits); the socket's `hello` carries the JWT
//! that `auth` checks, and a later `hello` (Hrana 2 and 3) replaces it.
//!
//! Each stream is a task of its own (`lane`): its requests run in order, the socket's other
//! streams run theirs meanwhile, and answers go back as they are ready (Hrana allows any
//! order). At most 64 requests of a socket are running or waiting to be sent; past that the
//! socket is not read (back-pressure through TCP), and a client that does not read its
//! answers is dropped after `send_timeout`, or once its outgoing buffer passes its bound.
//! Messages are read into typed requests (a hostile field is refused, not built), from JSON
//! text or protobuf; both encodings run the same requests. When the socket ends (the client
//! vanished, the server stops, it sat idle or never said hello), its lanes stop: a statement
//! still running is interrupted and every stream is rolled back. A stream or cursor left
//! unused past the stream expiry, or whose transaction holds the write lock past its time
//! limit, is dropped by its lane. The token is checked at every request (it may expire).

mod lane;
mod messages;
mod protobuf;
mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use libsql_hrana::proto::Error;
use tokio::sync::{watch, OwnedSemaphorePermit};

pub use session::Session;

use crate::auth::{Auth, AuthError};
use crate::hrana::Hrana;
use crate::metrics::Metrics;
use crate::namespace::NamespaceName;

/// The subprotocols served, best first: a client gets the best one it offers.
pub const PROTOCOLS: [&str; 4] = ["hrana3-protobuf", "hrana3", "hrana2", "hrana1"];

/// Hrana's version on a socket: which requests it may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    Hrana1 = 1,
    Hrana2 = 2,
    Hrana3 = 3,
}

/// How a socket's messages are encoded: JSON text, or protobuf binary (`hrana3-protobuf`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Protobuf,
}

impl Version {
    /// The version and encoding of the subprotocol the upgrade chose; a client that offered
    /// none of them speaks Hrana 1.
    pub fn of(protocol: Option<&str>) -> (Version, Encoding) {
        match protocol {
            Some("hrana3-protobuf") => (Version::Hrana3, Encoding::Protobuf),
            Some("hrana3") => (Version::Hrana3, Encoding::Json),
            Some("hrana2") => (Version::Hrana2, Encoding::Json),
            _ => (Version::Hrana1, Encoding::Json),
        }
    }
}

/// The bounds of one socket.
#[derive(Debug, Clone, Copy)]
pub struct SocketLimits {
    /// Streams open at once on one socket (each holds a SQLite connection).
    pub max_streams: usize,
    /// Cursors open at once on one socket (each holds its batch's answer until fetched).
    pub max_cursors: usize,
    /// A socket with no message for this long is closed (pings do not count).
    pub idle_timeout: Duration,
    /// A stream or cursor left unused this long is rolled back (as an HTTP stream expires).
    pub stream_expiry: Duration,
    /// A client that does not take an answer within this is disconnected; also how long a
    /// new socket has for its hello.
    pub send_timeout: Duration,
    /// Most values one message may hold (see `hrana::shape`).
    pub max_values: usize,
}

/// What a socket needs from the server.
pub struct Socket {
    pub hrana: Hrana,
    pub auth: Arc<Auth>,
    pub metrics: Arc<Metrics>,
    pub ns: NamespaceName,
    pub limits: SocketLimits,
    /// Turns true when the server stops: the socket closes ("going away").
    pub stop: watch::Receiver<bool>,
    /// Its place among the sockets served at once.
    pub place: OwnedSemaphorePermit,
    /// The places of the requests running at once, shared with HTTP
    /// (`--max-concurrent-requests`), and how long a request waits for one.
    pub running: Arc<tokio::sync::Semaphore>,
    pub queue_wait: Duration,
}

/// Serves one upgraded socket until it ends.
pub async fn serve(socket: WebSocket, server: Socket) {
    let protocol = socket.protocol().and_then(|p| p.to_str().ok());
    let (version, encoding) = Version::of(protocol);
    let label = PROTOCOLS.into_iter().find(|p| Some(*p) == protocol).unwrap_or("none");
    server.metrics.count_by("sqld_ws_sockets_opened_total", "Hrana WebSockets opened, by subprotocol.", "protocol", label, 1);
    server.metrics.gauge_add("sqld_ws_sockets", 1);
    let metrics = server.metrics.clone();
    Session::new(server, version, encoding).run(socket).await;
    metrics.gauge_add("sqld_ws_sockets", -1);
}

/// A Hrana error.
fn error(message: impl Into<String>, code: &str) -> Error {
    Error { message: message.into(), code: code.into() }
}

fn auth_error(e: &AuthError) -> Error {
    error(e.to_string(), e.code())
}

/// A close frame with `code` and a reason.
fn close(code: u16, reason: &'static str) -> Message {
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

/// WebSocket close codes used here.
mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL: u16 = 1002;
    pub const UNSUPPORTED: u16 = 1003;
    pub const POLICY: u16 = 1008;
}
