//! Hrana's transports side by side against one real `sqld`, same run, same concurrency: point
//! reads (8 clients) and sequential single-row inserts over HTTP JSON (`/v2/pipeline`, a
//! stream per request as the HTTP clients use it), HTTP protobuf (`/v3-protobuf/pipeline`, the
//! same) and WebSocket (`hrana3` JSON, a socket and a stream per client as `@libsql/client`
//! keeps them). WebSocket protobuf (`hrana3-protobuf`) is not served yet.
//!
//! `cargo bench --bench transports` prints a table and writes `bench-results/transports.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

mod common;
#[path = "../tests/common/hrana_protobuf.rs"]
mod hrana_protobuf;

use common::{close, int, spawn_sqld, stmt, stop_sqld, Http};
use prost::Message as _;

const CLIENTS: usize = 8;
const READS_PER_CLIENT: usize = 2_500;
const INSERTS: usize = 2_000;
const KEYS: i64 = 10_000;

/// One Hrana WebSocket with one open stream.
struct Ws {
    socket: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    next_id: i32,
}

impl Ws {
    async fn open(addr: std::net::SocketAddr) -> Ws {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let mut request = format!("ws://{addr}/").into_client_request().unwrap();
        request.headers_mut().insert("sec-websocket-protocol", "hrana3".parse().unwrap());
        let (socket, _) = tokio_tungstenite::client_async(request, stream).await.unwrap();
        let mut ws = Ws { socket, next_id: 0 };
        ws.socket.send(Message::Text(json!({"type": "hello", "jwt": null}).to_string())).await.unwrap();
        ws.receive().await;
        ws.request(json!({"type": "open_stream", "stream_id": 1})).await;
        ws
    }

    async fn receive(&mut self) -> Value {
        loop {
            if let Message::Text(text) = self.socket.next().await.unwrap().unwrap() {
                return serde_json::from_str(&text).unwrap();
            }
        }
    }

    async fn request(&mut self, request: Value) -> Value {
        self.next_id += 1;
        let message = json!({"type": "request", "request_id": self.next_id, "request": request});
        self.socket.send(Message::Text(message.to_string())).await.unwrap();
        let answer = self.receive().await;
        assert_eq!(answer["type"], "response_ok", "{answer}");
        answer
    }

    async fn execute(&mut self, sql: &str, args: Vec<Value>) -> Value {
        self.request(json!({"type": "execute", "stream_id": 1, "stmt": {"sql": sql, "args": args, "want_rows": true}})).await
    }
}

struct Measured {
    per_second: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn measured(count: usize, elapsed: Duration, mut latencies: Vec<f64>) -> Measured {
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| latencies[((latencies.len() - 1) as f64 * p).round() as usize];
    Measured { per_second: count as f64 / elapsed.as_secs_f64(), p50_ms: at(0.5), p99_ms: at(0.99) }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn http_reads(url: &str) -> Measured {
    let http = Arc::new(Http::new(url.to_owned()));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let http = http.clone();
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(READS_PER_CLIENT);
                let mut key = c as i64;
                for _ in 0..READS_PER_CLIENT {
                    key = (key * 7919 + 13) % KEYS;
                    let at = Instant::now();
                    http.pipeline(vec![stmt("SELECT v FROM kv WHERE k = ?", vec![int(key)]), close()]).await;
                    latencies.push(ms(at.elapsed()));
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    measured(CLIENTS * READS_PER_CLIENT, started.elapsed(), all)
}

async fn ws_reads(addr: std::net::SocketAddr) -> Measured {
    let mut sockets = Vec::new();
    for _ in 0..CLIENTS {
        sockets.push(Ws::open(addr).await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(c, mut ws)| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(READS_PER_CLIENT);
                let mut key = c as i64;
                for _ in 0..READS_PER_CLIENT {
                    key = (key * 7919 + 13) % KEYS;
                    let at = Instant::now();
                    ws.execute("SELECT v FROM kv WHERE k = ?", vec![int(key)]).await;
                    latencies.push(ms(at.elapsed()));
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    measured(CLIENTS * READS_PER_CLIENT, started.elapsed(), all)
}

/// One protobuf pipeline: a statement with one integer argument, then close.
async fn protobuf_request(client: &hyper::Client<hyper::client::HttpConnector>, url: &str, sql: &str, arg: i64) {
    let arg = hrana_protobuf::Value { integer: Some(arg), ..Default::default() };
    let body =
        hrana_protobuf::PipelineReq { baton: None, requests: vec![hrana_protobuf::execute(sql, vec![arg]), hrana_protobuf::close()] };
    let request = hyper::Request::post(url).body(hyper::Body::from(body.encode_to_vec())).unwrap();
    let response = client.request(request).await.unwrap();
    assert!(response.status().is_success());
    let answer = hrana_protobuf::PipelineResp::decode(hyper::body::to_bytes(response.into_body()).await.unwrap()).unwrap();
    assert!(answer.results[0].error.is_none(), "{:?}", answer.results[0].error);
}

async fn protobuf_reads(url: &str) -> Measured {
    let client = hyper::Client::new();
    let started = Instant::now();
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (client, url) = (client.clone(), url.to_owned());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(READS_PER_CLIENT);
                let mut key = c as i64;
                for _ in 0..READS_PER_CLIENT {
                    key = (key * 7919 + 13) % KEYS;
                    let at = Instant::now();
                    protobuf_request(&client, &url, "SELECT v FROM kv WHERE k = ?", key).await;
                    latencies.push(ms(at.elapsed()));
                }
                latencies
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    measured(CLIENTS * READS_PER_CLIENT, started.elapsed(), all)
}

async fn protobuf_inserts(url: &str, first: i64) -> Measured {
    let client = hyper::Client::new();
    let mut latencies = Vec::with_capacity(INSERTS);
    let started = Instant::now();
    for i in 0..INSERTS as i64 {
        let at = Instant::now();
        protobuf_request(&client, url, "INSERT INTO ins VALUES (?, randomblob(100))", first + i).await;
        latencies.push(ms(at.elapsed()));
    }
    measured(INSERTS, started.elapsed(), latencies)
}

async fn http_inserts(url: &str, first: i64) -> Measured {
    let http = Http::new(url.to_owned());
    let mut latencies = Vec::with_capacity(INSERTS);
    let started = Instant::now();
    for i in 0..INSERTS as i64 {
        let at = Instant::now();
        http.pipeline(vec![stmt("INSERT INTO ins VALUES (?, randomblob(100))", vec![int(first + i)]), close()]).await;
        latencies.push(ms(at.elapsed()));
    }
    measured(INSERTS, started.elapsed(), latencies)
}

async fn ws_inserts(addr: std::net::SocketAddr, first: i64) -> Measured {
    let mut ws = Ws::open(addr).await;
    let mut latencies = Vec::with_capacity(INSERTS);
    let started = Instant::now();
    for i in 0..INSERTS as i64 {
        let at = Instant::now();
        ws.execute("INSERT INTO ins VALUES (?, randomblob(100))", vec![int(first + i)]).await;
        latencies.push(ms(at.elapsed()));
    }
    measured(INSERTS, started.elapsed(), latencies)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (child, user, _) = spawn_sqld(dir.path(), &["--max-concurrent-connections", "1000"]);
    let url = format!("http://{user}/v2/pipeline");
    let rows = rt.block_on(async {
        let http = Http::new(url.clone());
        http.pipeline(vec![
            stmt("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB)", vec![]),
            stmt(&format!("INSERT INTO kv SELECT value, randomblob(100) FROM generate_series(0, {})", KEYS - 1), vec![]),
            stmt("CREATE TABLE ins (k INTEGER PRIMARY KEY, v BLOB)", vec![]),
            close(),
        ])
        .await;
        // Alternating, twice each, so neither transport gains from going first.
        let protobuf_url = format!("http://{user}/v3-protobuf/pipeline");
        let mut rows: Vec<(&str, &str, Vec<Measured>)> = vec![
            ("point reads, 8 clients", "HTTP JSON", vec![]),
            ("point reads, 8 clients", "HTTP protobuf", vec![]),
            ("point reads, 8 clients", "WebSocket", vec![]),
            ("single-row inserts, sequential", "HTTP JSON", vec![]),
            ("single-row inserts, sequential", "HTTP protobuf", vec![]),
            ("single-row inserts, sequential", "WebSocket", vec![]),
        ];
        for round in 0..2i64 {
            let first = round * 30 * INSERTS as i64;
            rows[0].2.push(http_reads(&url).await);
            rows[1].2.push(protobuf_reads(&protobuf_url).await);
            rows[2].2.push(ws_reads(user).await);
            rows[5].2.push(ws_inserts(user, first).await);
            rows[4].2.push(protobuf_inserts(&protobuf_url, first + 10 * INSERTS as i64).await);
            rows[3].2.push(http_inserts(&url, first + 20 * INSERTS as i64).await);
        }
        rows
    });
    stop_sqld(child);

    println!("\n{:<34} {:<14} {:>10} {:>9} {:>9}", "workload (2 cores, best of 2)", "transport", "req/s", "p50 ms", "p99 ms");
    let mut json_rows = Vec::new();
    for (workload, transport, runs) in &rows {
        let best = runs.iter().max_by(|a, b| a.per_second.partial_cmp(&b.per_second).unwrap()).unwrap();
        println!("{workload:<34} {transport:<14} {:>10.0} {:>9.2} {:>9.2}", best.per_second, best.p50_ms, best.p99_ms);
        json_rows.push(json!({"workload": workload, "transport": transport, "per_second": best.per_second, "p50_ms": best.p50_ms, "p99_ms": best.p99_ms,
            "all_per_second": runs.iter().map(|m| m.per_second).collect::<Vec<_>>()}));
    }
    std::fs::create_dir_all("bench-results").unwrap();
    let path = std::path::Path::new("bench-results/transports.json");
    std::fs::write(path, serde_json::to_string_pretty(&json!({"results": json_rows})).unwrap()).unwrap();
    println!("\nwritten to {}", path.canonicalize().unwrap().display());
}
