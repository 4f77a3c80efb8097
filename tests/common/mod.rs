//! Test harness: `sqld` inside a turmoil host, a hyper client over the simulated network, and
//! a real `sqld` process on free local ports.

#![allow(dead_code)]

pub mod hrana_protobuf;
pub mod primary;
pub mod process;
pub mod tokens;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Body, Method, Request, StatusCode};
use libsql_server::net::Listener;
use libsql_server::{Config, Server};
use serde_json::Value;

pub const USER_PORT: u16 = 8080;
pub const ADMIN_PORT: u16 = 9090;

/// turmoil's listener as a server listener.
pub struct SimListener(pub turmoil::net::TcpListener);

impl Listener for SimListener {
    type Io = turmoil::net::TcpStream;

    async fn accept(&mut self) -> std::io::Result<Self::Io> {
        self.0.accept().await.map(|(stream, _)| stream)
    }
}

/// A simulation for one test. Note what turmoil does with the server's blocking work: while a
/// `spawn_blocking` task runs, tokio's paused clock may not auto-advance, so the host's step
/// waits for it. Blocking work thus runs one task at a time under turmoil, and simulated time
/// does not run ahead of it; tests of truly concurrent blocking work (writers queueing on the
/// write lock) run against a real process instead.
pub fn sim() -> turmoil::Sim<'static> {
    turmoil::Builder::new()
        .simulation_duration(Duration::from_secs(3600))
        .tick_duration(Duration::from_micros(100))
        .build()
}

/// Starts `sqld` in host `name` with its own data directory; `tweak` adjusts the config.
pub fn start_server(sim: &mut turmoil::Sim<'_>, name: &str, tweak: impl Fn(&mut Config) + 'static) -> Arc<tempfile::TempDir> {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let path: PathBuf = dir.path().to_owned();
    sim.host(name, move || {
        let mut config = Config::with_db_path(path.clone());
        config.enable_namespaces = true;
        tweak(&mut config);
        async move {
            let server = Server::open(config).await?;
            let user = SimListener(turmoil::net::TcpListener::bind(("0.0.0.0", USER_PORT)).await?);
            let admin = SimListener(turmoil::net::TcpListener::bind(("0.0.0.0", ADMIN_PORT)).await?);
            server.serve(user, Some(admin), None::<SimListener>, std::future::pending()).await;
            Ok(())
        }
    });
    dir
}

/// One HTTP/1.1 request over the simulated network; the answer's status and body.
pub async fn call(host: &str, port: u16, method: Method, path: &str, headers: &[(&str, &str)], body: impl Into<Body>) -> (StatusCode, Vec<u8>) {
    try_call(host, port, method, path, headers, body).await.unwrap_or_else(|e| panic!("{e}"))
}

/// [`call`], or why it failed (a server refusing the connection may close it mid-request).
pub async fn try_call(
    host: &str,
    port: u16,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Body>,
) -> Result<(StatusCode, Vec<u8>), String> {
    let stream = turmoil::net::TcpStream::connect((host, port)).await.map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::handshake(stream).await.map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let mut request = Request::builder().method(method).uri(path).header("host", host);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = sender.send_request(request.body(body.into()).unwrap()).await.map_err(|e| format!("request: {e}"))?;
    let status = response.status();
    let body = hyper::body::to_bytes(response.into_body()).await.map_err(|e| format!("body: {e}"))?;
    Ok((status, body.to_vec()))
}

pub fn json(body: &[u8]) -> Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Admin API call; JSON answer.
pub async fn admin(method: Method, path: &str, body: &str) -> (StatusCode, Value) {
    let (status, body) = call("primary", ADMIN_PORT, method, path, &[], body.to_owned()).await;
    (status, if body.is_empty() { Value::Null } else { json(&body) })
}

/// A Hrana pipeline on namespace `ns`; the answer's status and JSON.
pub async fn pipeline(ns: &str, body: Value) -> (StatusCode, Value) {
    let (status, body) = call("primary", USER_PORT, Method::POST, "/v2/pipeline", &[("x-namespace", ns)], body.to_string()).await;
    (status, json(&body))
}

pub fn execute(sql: &str) -> Value {
    serde_json::json!({"type": "execute", "stmt": {"sql": sql}})
}

pub fn close() -> Value {
    serde_json::json!({"type": "close"})
}

/// The rows of the `i`th result of a pipeline answer, panicking on an error result.
pub fn rows(answer: &Value, i: usize) -> Vec<Value> {
    let result = &answer["results"][i];
    assert_eq!(result["type"], "ok", "result {i} failed: {result}");
    result["response"]["result"]["rows"].as_array().unwrap().clone()
}

/// The error code of the `i`th result, panicking if it succeeded.
pub fn error_code(answer: &Value, i: usize) -> String {
    let result = &answer["results"][i];
    assert_eq!(result["type"], "error", "result {i} succeeded: {result}");
    result["error"]["code"].as_str().unwrap().to_owned()
}

/// Runs one simulated client against a server started with `tweak`.
pub fn run_sim<F>(tweak: impl Fn(&mut Config) + 'static, client: F)
where
    F: std::future::Future<Output = Result<(), Box<dyn std::error::Error>>> + 'static,
{
    let mut sim = sim();
    let _dir = start_server(&mut sim, "primary", tweak);
    sim.client("client", client);
    sim.run().unwrap();
}
