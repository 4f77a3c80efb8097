//! Embedded replicas of real libSQL clients against a real `sqld` process.
//!
//! A test binary of its own: the `libsql` crate's local databases insist on configuring
//! SQLite's threading mode before SQLite is first used in the process, which the in-process
//! tests of the other binary would already have done.

mod common;

mod auth_clients;

mod foreign_clients;
mod generation_switch;
mod reset_replicas;
mod ws_clients;
mod grpc_v1;
mod sync_v2;
