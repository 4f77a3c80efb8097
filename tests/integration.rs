//! Integration tests of the real server: under turmoil for network behaviour (the server runs
//! in a simulated host, clients call it over the simulated network), and as a real `sqld`
//! process for clients and signals.

mod common;

mod crash;
mod grpc;

mod abuse;
mod admin;
mod auth;
mod bad_input;
mod client;
mod hrana;
mod interop;
mod isolation;
mod limits;
mod log_bounds;
mod log_durability;
mod process;
mod protobuf;
mod repair;
mod replica;
mod replication;
mod websocket;
