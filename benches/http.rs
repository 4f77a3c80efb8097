//! HTTP API throughput beside the same work on a bare `libsql-sys` connection, in one run.
//!
//! `cargo bench --bench http` prints a table and writes `bench-results/http.json`.
//! Both sides use the same durability settings (WAL, `synchronous=FULL`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use libsql_server::{Config, Server};
use libsql_sys::rusqlite::{self, params, OpenFlags};
use libsql_sys::wal::{Sqlite3Wal, Sqlite3WalManager};
use serde_json::{json, Value};

mod common;

use common::{close, int, stmt, Http};

const SEQUENTIAL_INSERTS: usize = 2_000;
const BATCHES: usize = 20;
const BATCH_ROWS: usize = 1_000;
const READ_CLIENTS: usize = 8;
const READS_PER_CLIENT: usize = 2_500;
const KEYS: i64 = 10_000;

struct Row {
    workload: &'static str,
    unit: &'static str,
    http: f64,
    bare: f64,
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let rows = rt.block_on(run());
    println!("\n{:<44} {:>14} {:>14} {:>8}", "workload (2 cores)", "HTTP API", "bare", "ratio");
    for r in &rows {
        println!("{:<44} {:>10.0} {:<3} {:>10.0} {:<3} {:>7.1}%", r.workload, r.http, r.unit, r.bare, r.unit, 100.0 * r.http / r.bare);
    }
    let json: Vec<Value> = rows
        .iter()
        .map(|r| json!({"workload": r.workload, "unit": r.unit, "http": r.http, "bare": r.bare, "ratio": r.http / r.bare}))
        .collect();
    std::fs::create_dir_all("bench-results").unwrap();
    let path = std::path::Path::new("bench-results/http.json");
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nwritten to {}", path.canonicalize().unwrap().display());
}

async fn run() -> Vec<Row> {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::open(Config::with_db_path(dir.path().join("server"))).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v2/pipeline", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(listener, None::<tokio::net::TcpListener>, None::<tokio::net::TcpListener>, async move {
        let _ = stopped.await;
    }));
    let http = Http::new(url);
    let bare_path = dir.path().join("bare.db");

    http.pipeline(vec![stmt("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB)", vec![]), close()]).await;
    let bare = open_bare(&bare_path);
    bare.execute("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB)", []).unwrap();

    let mut rows = Vec::new();

    // Single-row autocommit inserts, one after the other.
    let started = Instant::now();
    for i in 0..SEQUENTIAL_INSERTS as i64 {
        http.pipeline(vec![stmt("INSERT INTO kv VALUES (?, randomblob(100))", vec![int(i)]), close()]).await;
    }
    let http_rate = SEQUENTIAL_INSERTS as f64 / started.elapsed().as_secs_f64();
    let bare_rate = tokio::task::block_in_place(|| {
        let started = Instant::now();
        let mut insert = bare.prepare("INSERT INTO kv VALUES (?, randomblob(100))").unwrap();
        for i in 0..SEQUENTIAL_INSERTS as i64 {
            insert.execute(params![i]).unwrap();
        }
        SEQUENTIAL_INSERTS as f64 / started.elapsed().as_secs_f64()
    });
    rows.push(Row { workload: "single-row autocommit inserts (sequential)", unit: "tx/s", http: http_rate, bare: bare_rate });

    // Batches of 1000 rows, each one transaction.
    let started = Instant::now();
    for b in 0..BATCHES {
        let base = (SEQUENTIAL_INSERTS + b * BATCH_ROWS) as i64;
        let mut steps = vec![json!({"stmt": {"sql": "BEGIN"}})];
        for i in 0..BATCH_ROWS as i64 {
            steps.push(json!({"condition": {"type": "ok", "step": i}, "stmt": {"sql": "INSERT INTO kv VALUES (?, randomblob(100))", "args": [int(base + i)]}}));
        }
        steps.push(json!({"condition": {"type": "ok", "step": BATCH_ROWS}, "stmt": {"sql": "COMMIT"}}));
        let answer = http.pipeline(vec![json!({"type": "batch", "batch": {"steps": steps}}), close()]).await;
        assert!(answer["results"][0]["response"]["result"]["step_results"][BATCH_ROWS + 1].is_object(), "batch failed");
    }
    let http_rate = (BATCHES * BATCH_ROWS) as f64 / started.elapsed().as_secs_f64();
    let bare_rate = tokio::task::block_in_place(|| {
        let started = Instant::now();
        for b in 0..BATCHES {
            let base = (SEQUENTIAL_INSERTS + b * BATCH_ROWS) as i64;
            bare.execute_batch("BEGIN").unwrap();
            let mut insert = bare.prepare_cached("INSERT INTO kv VALUES (?, randomblob(100))").unwrap();
            for i in 0..BATCH_ROWS as i64 {
                insert.execute(params![base + i]).unwrap();
            }
            bare.execute_batch("COMMIT").unwrap();
        }
        (BATCHES * BATCH_ROWS) as f64 / started.elapsed().as_secs_f64()
    });
    rows.push(Row { workload: "1000-row batches (one transaction each)", unit: "row/s", http: http_rate, bare: bare_rate });

    // Point reads from 8 concurrent clients.
    let http = Arc::new(http);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..READ_CLIENTS {
        let http = http.clone();
        tasks.push(tokio::spawn(async move {
            let mut key = c as i64;
            for _ in 0..READS_PER_CLIENT {
                key = (key * 7919 + 13) % KEYS;
                let answer = http.pipeline(vec![stmt("SELECT v FROM kv WHERE k = ?", vec![int(key)]), close()]).await;
                assert_eq!(answer["results"][0]["type"], "ok");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let http_rate = (READ_CLIENTS * READS_PER_CLIENT) as f64 / started.elapsed().as_secs_f64();
    drop(bare);
    let bare_rate = tokio::task::block_in_place(|| {
        let started = Instant::now();
        std::thread::scope(|s| {
            for c in 0..READ_CLIENTS {
                let path = bare_path.clone();
                s.spawn(move || {
                    let conn = open_bare(&path);
                    let mut select = conn.prepare("SELECT v FROM kv WHERE k = ?").unwrap();
                    let mut key = c as i64;
                    for _ in 0..READS_PER_CLIENT {
                        key = (key * 7919 + 13) % KEYS;
                        let _: Vec<u8> = select.query_row(params![key], |r| r.get(0)).unwrap();
                    }
                });
            }
        });
        (READ_CLIENTS * READS_PER_CLIENT) as f64 / started.elapsed().as_secs_f64()
    });
    rows.push(Row { workload: "point reads, 8 concurrent clients", unit: "q/s", http: http_rate, bare: bare_rate });

    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), serving).await;
    rows
}

/// A bare connection with the server's settings: WAL, synchronous=FULL, same auto-checkpoint.
fn open_bare(path: &std::path::Path) -> libsql_sys::Connection<Sqlite3Wal> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = libsql_sys::Connection::open(path, flags, Sqlite3WalManager::new(), 1000, None).unwrap();
    conn.pragma_update(None, "synchronous", "FULL").unwrap();
    conn.busy_timeout(Duration::from_secs(5)).unwrap();
    let _: &rusqlite::Connection = &conn;
    conn
}
