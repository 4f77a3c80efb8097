//! # libsql-server
//!
//! A server for libSQL databases, compatible with the libSQL server (`sqld`), built around one
//! promise: a broken replication log never costs a tenant its data or the fleet its uptime.
//!
//! ## Shape
//! Dependencies point one way, from the transports inward:
//!
//! ```text
//!   http (user API: Hrana; admin API)  ──►  hrana (streams, statements, batons)
//!   ws (Hrana over WebSocket)  ─────────────►  │
//!        │  └──►  auth (credentials → access)    │
//!        └──────────────►  namespace (NamespaceStore: lifecycle, per-namespace lock)
//!                                               │
//!                                      database (connections, write gate, pool)
//! ```
//!
//! * [`namespace::NamespaceStore`] knows which namespaces exist, loads them on first use,
//!   closes the least recently used idle ones, and serialises create/load/close/destroy of
//!   one namespace with a per-namespace lock.
//! * [`database::Database`] is one namespace's SQLite file: pooled connections, and the
//!   [`database::WriteGate`] every writer queues on (bounded) instead of meeting SQLITE_BUSY.
//! * [`auth`] turns the credential a transport carried into a namespace's access (read-only
//!   or read-write), or a refusal; every user-facing transport calls it.
//! * [`hrana`] runs the Hrana protocol on those connections; [`http`] parses HTTP requests
//!   and maps every error to a status in one place (`http::error`).
//! * All SQLite calls, fsyncs and directory scans run on tokio's blocking pool
//!   ([`blocking::run`]), so one namespace's slow work never stalls another's requests.

pub mod auth;
pub mod blocking;
pub mod config;
pub mod database;
pub mod durable;
pub mod grpc;
pub mod hrana;
pub mod http;
pub mod limit_hits;
pub mod metrics;
pub mod namespace;
pub mod net;
pub mod replica;
pub mod replication;
pub mod server;
pub mod ws;

pub use config::Config;
pub use server::Server;
