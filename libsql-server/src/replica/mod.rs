//! Following a primary over gRPC (this server, or the libSQL server): the client side of
//! `wal_log.ReplicationLog`, beside the primary's `replication`. [`client::PrimaryClient`] is
//! what `libsql_replication`'s `Replicator` pulls through; [`follower::Follower`] keeps one
//! namespace's copy up to date with it.
//!
//! Replica mode (`--primary-grpc-url`: namespaces served from such copies, writes forwarded)
//! builds on this and is not there yet.

pub mod client;
pub mod follower;

pub use client::Progress;
pub use follower::Follower;
