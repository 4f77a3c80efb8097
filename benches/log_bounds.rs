//! What the replication log costs as a namespace grows past `--max-log-size`: a real `sqld`
//! per workload, on a fresh data directory, each taking 10k single-row inserts and then 100
//! transactions of 1 MB.
//!
//! * a namespace of about 250 MB at the default flags (200 MB log limit);
//! * one of about 3 MB at `--max-log-size 1`;
//! * the baseline of the same run: one of about 3 MB at the default flags (far below the limit,
//!   so no compaction at all).
//!
//! For each: compactions, peak and final size of `dbs/<ns>/` (sampled every 20 ms), the log's
//! write amplification (frames written to the wallog and to snapshots, transactions' frames
//! plus opening images plus snapshots, per frame the transactions changed: from the namespace's
//! stats) and insert latency p50/p99.
//!
//! `cargo bench --bench log_bounds` prints a table and writes `bench-results/log_bounds.json`.
//! `LOG_BOUNDS_BENCH_SCALE=0.1` shrinks the large namespace (a quick run).

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{close, spawn_sqld, stmt, stop_sqld, Http};

const INSERTS: usize = 10_000;
const BIG_TRANSACTIONS: usize = 100;

struct Workload {
    name: &'static str,
    size_mb: f64,
    flags: &'static [&'static str],
}

struct Sqld {
    child: Child,
    http: Http,
    admin: String,
    dir: PathBuf,
}

impl Sqld {
    fn start(dir: &Path, flags: &[&str]) -> Sqld {
        let (child, user, admin) = spawn_sqld(dir, flags);
        Sqld { child, http: Http::new(format!("http://{user}/v2/pipeline")), admin: format!("http://{admin}"), dir: dir.join("dbs/default") }
    }

    async fn exec(&self, sql: &str) {
        let answer = self.http.pipeline(vec![stmt(sql, vec![]), close()]).await;
        assert_eq!(answer["results"][0]["type"], "ok", "{sql}: {answer}");
    }

    async fn stats(&self) -> Value {
        let client = hyper::Client::new();
        let response = client.get(format!("{}/v1/namespaces/default/stats", self.admin).parse().unwrap()).await.unwrap();
        serde_json::from_slice(&hyper::body::to_bytes(response.into_body()).await.unwrap()).unwrap()
    }

    /// Waits until no compaction is pending or running (the log's stats say so), with SQLite's
    /// WAL moved into the data file, so the data file's size is the database's.
    async fn settle(&self) -> Value {
        for attempt in 0.. {
            if self.stats().await["replication"]["pending_compactions"] != 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            let request = hyper::Request::post(format!("{}/v1/namespaces/default/checkpoint", self.admin)).body(hyper::Body::empty()).unwrap();
            let response = hyper::Client::new().request(request).await.unwrap();
            assert!(response.status().is_success(), "checkpoint: {}", response.status());
            let stats = self.stats().await;
            if stats["replication"]["pending_compactions"] == 0 && (stats["wal_file_bytes"] == 0 || attempt > 100) {
                return stats;
            }
        }
        unreachable!()
    }

    fn stop(self) {
        stop_sqld(self.child);
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn counter(stats: &Value, name: &str) -> u64 {
    stats["replication"][name].as_u64().unwrap()
}

async fn run(workload: &Workload) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let sqld = Sqld::start(tmp.path(), workload.flags);
    sqld.exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)").await;
    // The starting size, 4 MB a statement (one transaction each, well inside the time limits).
    let rows = (workload.size_mb * 1_000_000.0 / 4_000.0) as usize;
    for chunk in (0..rows).step_by(1000) {
        let n = 1000.min(rows - chunk);
        sqld.exec(&format!("INSERT INTO t (v) SELECT randomblob(4000) FROM generate_series(1, {n})")).await;
    }
    let before = sqld.settle().await;
    let start_bytes = before["data_file_bytes"].as_u64().unwrap();

    let peak = Arc::new(AtomicU64::new(dir_bytes(&sqld.dir)));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop, dir) = (peak.clone(), stop.clone(), sqld.dir.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                peak.fetch_max(dir_bytes(&dir), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let mut latencies = Vec::with_capacity(INSERTS);
    for _ in 0..INSERTS {
        let started = Instant::now();
        sqld.exec("INSERT INTO t (v) VALUES (randomblob(100))").await;
        latencies.push(started.elapsed().as_secs_f64() * 1e3);
    }
    for _ in 0..BIG_TRANSACTIONS {
        sqld.exec("INSERT INTO t (v) SELECT randomblob(4000) FROM generate_series(1, 250)").await;
    }
    let after = sqld.settle().await;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    sqld.stop();
    let final_bytes = dir_bytes(&tmp.path().join("dbs/default"));
    let data_bytes = std::fs::metadata(tmp.path().join("dbs/default/data")).map_or(0, |m| m.len());

    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let delta = |name| counter(&after, name) - counter(&before, name);
    let changed = delta("transaction_frames");
    let written = changed + delta("image_frames") + delta("snapshot_frames");
    json!({
        "workload": workload.name,
        "start_mb": start_bytes as f64 / 1e6,
        "data_mb": data_bytes as f64 / 1e6,
        "compactions": delta("compactions"),
        "peak_dir_mb": peak.load(Ordering::Relaxed).max(final_bytes) as f64 / 1e6,
        "final_dir_mb": final_bytes as f64 / 1e6,
        "final_over_data": final_bytes as f64 / data_bytes as f64,
        "write_amplification": written as f64 / changed as f64,
        "insert_p50_ms": percentile(&latencies, 0.5),
        "insert_p99_ms": percentile(&latencies, 0.99),
    })
}

fn main() {
    let scale: f64 = std::env::var("LOG_BOUNDS_BENCH_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let workloads = [
        Workload { name: "~250 MB, default flags", size_mb: 250.0 * scale, flags: &[] },
        Workload { name: "~3 MB, --max-log-size 1", size_mb: 3.0, flags: &["--max-log-size", "1"] },
        Workload { name: "baseline: ~3 MB, default flags", size_mb: 3.0, flags: &[] },
    ];
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let results: Vec<Value> = workloads
        .iter()
        .map(|w| {
            let r = rt.block_on(run(w));
            eprintln!("{r}");
            r
        })
        .collect();

    println!("\n10k single-row inserts then 100 transactions of 1 MB (2-core VM)");
    println!(
        "{:<34} {:>8} {:>7} {:>9} {:>9} {:>8} {:>7} {:>8} {:>8}",
        "workload", "start MB", "compact", "peak MB", "final MB", "fin/data", "amplif", "p50 ms", "p99 ms"
    );
    for r in &results {
        println!(
            "{:<34} {:>8.1} {:>7} {:>9.1} {:>9.1} {:>8.2} {:>7.2} {:>8.2} {:>8.2}",
            r["workload"].as_str().unwrap(),
            r["start_mb"].as_f64().unwrap(),
            r["compactions"],
            r["peak_dir_mb"].as_f64().unwrap(),
            r["final_dir_mb"].as_f64().unwrap(),
            r["final_over_data"].as_f64().unwrap(),
            r["write_amplification"].as_f64().unwrap(),
            r["insert_p50_ms"].as_f64().unwrap(),
            r["insert_p99_ms"].as_f64().unwrap(),
        );
    }
    std::fs::create_dir_all("bench-results").unwrap();
    let path = Path::new("bench-results/log_bounds.json");
    std::fs::write(path, serde_json::to_string_pretty(&json!({"scale": scale, "results": results})).unwrap()).unwrap();
    println!("\nwritten to {}", path.canonicalize().unwrap().display());
}
