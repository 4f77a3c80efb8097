//! What the HTTP benches share: a Hrana pipeline client and its request builders.

#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hyper::{Body, Client, Method, Request};
use serde_json::{json, Value};

/// Pipelines to one server's `/v2/pipeline`.
pub struct Http {
    client: Client<hyper::client::HttpConnector>,
    url: String,
    namespace: Option<String>,
    /// The `authorization` value every request carries.
    credential: Option<String>,
}

impl Http {
    pub fn new(url: String) -> Self {
        Http { client: Client::new(), url, namespace: None, credential: None }
    }

    /// Pipelines to namespace `namespace` (the `x-namespace` header).
    pub fn with_namespace(url: String, namespace: &str) -> Self {
        Http { namespace: Some(namespace.to_owned()), ..Http::new(url) }
    }

    /// Every request carries `authorization: Bearer <token>`.
    pub fn with_token(self, token: Option<String>) -> Self {
        Http { credential: token.map(|t| format!("Bearer {t}")), ..self }
    }

    /// The answer, or `None` if the request failed or was not a success.
    pub async fn try_pipeline(&self, requests: Vec<Value>) -> Option<Value> {
        let body = json!({ "requests": requests }).to_string();
        let mut request = Request::builder().method(Method::POST).uri(&self.url);
        if let Some(namespace) = &self.namespace {
            request = request.header("x-namespace", namespace);
        }
        if let Some(credential) = &self.credential {
            request = request.header("authorization", credential);
        }
        let request = request.body(Body::from(body)).unwrap();
        let response = self.client.request(request).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        serde_json::from_slice(&hyper::body::to_bytes(response.into_body()).await.ok()?).ok()
    }

    pub async fn pipeline(&self, requests: Vec<Value>) -> Value {
        self.try_pipeline(requests).await.expect("a successful pipeline")
    }
}

pub fn stmt(sql: &str, args: Vec<Value>) -> Value {
    json!({"type": "execute", "stmt": {"sql": sql, "args": args}})
}

pub fn close() -> Value {
    json!({"type": "close"})
}

pub fn int(i: i64) -> Value {
    json!({"type": "integer", "value": i.to_string()})
}

/// This build's `sqld` on free local ports (user, admin), data in `dir`, with `args`; returns
/// once it accepts connections.
pub fn spawn_sqld(dir: &Path, args: &[&str]) -> (Child, SocketAddr, SocketAddr) {
    let port = || TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (user, admin) = (port(), port());
    let child = Command::new(env!("CARGO_BIN_EXE_sqld"))
        .args(["--db-path", dir.to_str().unwrap(), "--http-listen-addr", &user.to_string(), "--admin-listen-addr", &admin.to_string()])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(user).is_err() {
        assert!(Instant::now() < deadline, "sqld did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    (child, user, admin)
}

/// Stops a `sqld` started by [`spawn_sqld`] with SIGTERM and waits for it.
pub fn stop_sqld(mut child: Child) {
    let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let _ = child.wait();
}

/// CPU time (user + system) the process `pid` has used so far, in microseconds.
pub fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): utime and stime are 14th and 15th.
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / per_second * 1e6
}
