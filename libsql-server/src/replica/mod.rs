//! Following a primary over gRPC (this server, or the libSQL server): the client side of
//! `wal_log.ReplicationLog` and `proxy.Proxy`, beside the primary's `replication`.
//! [`client::PrimaryClient`] is what `libsql_replication`'s `Replicator` pulls through;
//! [`follower::Follower`] keeps one namespace's copy up to date with it; [`writes`] sends the
//! primary what a copy cannot run. Replica mode (`--primary-grpc-url`) builds namespaces on
//! these (see `namespace::replica`).

pub mod client;
pub mod follower;
pub mod program;
pub mod value;
pub mod writes;

pub use client::Progress;
pub use follower::{Follower, Readiness};
pub use writes::PrimaryWrites;
