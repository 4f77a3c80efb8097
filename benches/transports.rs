//! Hrana's transports side by side against one real `sqld`, same run, same concurrency: point
//! reads (8 clients) and sequential single-row inserts over HTTP JSON (`/v2/pipeline`, a
//! stream per request as the HTTP clients use it), HTTP protobuf (`/v3-protobuf/pipeline`, the
//! same) and WebSocket (`hrana3` JSON, a socket and a stream per client as `@libsql/client`
//! keeps them). WebSocket protobuf (`hrana3-protobuf`) is not served yet.
//!
//! `cargo bench --bench transports` prints a table and writes `bench-results/transports.json`.

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

/// A client of one transport, sending one statement with one integer argument at a time.
enum Client {
    Json(Http),
    Protobuf(hyper::Client<hyper::client::HttpConnector>, String),
    WebSocket(Ws),
}

impl Client {
    async fn open(transport: &str, user: std::net::SocketAddr) -> Client {
        match transport {
            "HTTP JSON" => Client::Json(Http::new(format!("http://{user}/v2/pipeline"))),
            "HTTP protobuf" => Client::Protobuf(hyper::Client::new(), format!("http://{user}/v3-protobuf/pipeline")),
            _ => Client::WebSocket(Ws::open(user).await),
        }
    }

    async fn run(&mut self, sql: &str, arg: i64) {
        match self {
            Client::Json(http) => {
                http.pipeline(vec![stmt(sql, vec![int(arg)]), close()]).await;
            }
            Client::Protobuf(client, url) => {
                let arg = hrana_protobuf::Value { integer: Some(arg), ..Default::default() };
                let requests = vec![hrana_protobuf::execute(sql, vec![arg]), hrana_protobuf::close()];
                let body = hrana_protobuf::PipelineReq { baton: None, requests };
                let request = hyper::Request::post(url.as_str()).body(hyper::Body::from(body.encode_to_vec())).unwrap();
                let response = client.request(request).await.unwrap();
                assert!(response.status().is_success());
                let answer = hrana_protobuf::PipelineResp::decode(hyper::body::to_bytes(response.into_body()).await.unwrap()).unwrap();
                assert!(answer.results[0].error.is_none(), "{:?}", answer.results[0].error);
            }
            Client::WebSocket(ws) => {
                ws.execute(sql, vec![int(arg)]).await;
            }
        }
    }
}

/// Point reads from `CLIENTS` clients of `transport` at once.
async fn reads(transport: &str, user: std::net::SocketAddr) -> Measured {
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Client::open(transport, user).await);
    }
    let started = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, mut client)| {
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(READS_PER_CLIENT);
                let mut key = c as i64;
                for _ in 0..READS_PER_CLIENT {
                    key = (key * 7919 + 13) % KEYS;
                    let at = Instant::now();
                    client.run("SELECT v FROM kv WHERE k = ?", key).await;
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

/// Single-row inserts one after the other over `transport`, keys from `first` on.
async fn inserts(transport: &str, user: std::net::SocketAddr, first: i64) -> Measured {
    let mut client = Client::open(transport, user).await;
    let mut latencies = Vec::with_capacity(INSERTS);
    let started = Instant::now();
    for i in 0..INSERTS as i64 {
        let at = Instant::now();
        client.run("INSERT INTO ins VALUES (?, randomblob(100))", first + i).await;
        latencies.push(ms(at.elapsed()));
    }
    measured(INSERTS, started.elapsed(), latencies)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (child, user, _) = spawn_sqld(dir.path(), &["--max-concurrent-connections", "1000"]);
    let rows = rt.block_on(async {
        let http = Http::new(format!("http://{user}/v2/pipeline"));
        http.pipeline(vec![
            stmt("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB)", vec![]),
            stmt(&format!("INSERT INTO kv SELECT value, randomblob(100) FROM generate_series(0, {})", KEYS - 1), vec![]),
            stmt("CREATE TABLE ins (k INTEGER PRIMARY KEY, v BLOB)", vec![]),
            close(),
        ])
        .await;
        // Alternating, twice each, so no transport gains from going first.
        const TRANSPORTS: [&str; 3] = ["HTTP JSON", "HTTP protobuf", "WebSocket"];
        let mut rows: Vec<(&str, &str, Vec<Measured>)> = Vec::new();
        for workload in ["point reads, 8 clients", "single-row inserts, sequential"] {
            rows.extend(TRANSPORTS.map(|transport| (workload, transport, Vec::new())));
        }
        for round in 0..2i64 {
            for (i, transport) in TRANSPORTS.into_iter().enumerate() {
                rows[i].2.push(reads(transport, user).await);
            }
            for (i, transport) in TRANSPORTS.into_iter().enumerate().rev() {
                let first = (round * 3 + i as i64) * 10 * INSERTS as i64;
                rows[TRANSPORTS.len() + i].2.push(inserts(transport, user, first).await);
            }
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
