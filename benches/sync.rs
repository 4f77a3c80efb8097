//! Sync protocol v2 as embedded replicas see it, against a real `sqld` process, each figure
//! beside a baseline from the same run.
//!
//! `cargo bench --bench sync` prints a table and writes `bench-results/sync.json`:
//! * initial sync (bootstrap) of 20k and 200k rows with the `libsql` crate's synced database,
//!   beside copying the (checkpointed) data file with an fsync;
//! * steady-state lag under a write load: a commit acknowledged by the primary until it is
//!   visible on a replica after `sync()`, beside the primary's own commit latency.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

struct Sqld {
    child: Child,
    url: String,
}

impl Sqld {
    fn start(dir: &Path) -> Sqld {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sqld"))
            .args(["--db-path", dir.to_str().unwrap(), "--http-listen-addr", &addr.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "sqld did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Sqld { child, url: format!("http://{addr}") }
    }

    async fn connect(&self) -> libsql::Connection {
        libsql::Builder::new_remote(self.url.clone(), String::new())
            .connector(hyper::client::HttpConnector::new())
            .build()
            .await
            .unwrap()
            .connect()
            .unwrap()
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

async fn replica(url: &str, path: &Path) -> libsql::Database {
    libsql::Builder::new_synced_database(path, url.to_owned(), String::new())
        .connector(hyper::client::HttpConnector::new())
        .build()
        .await
        .unwrap()
}

/// Commits per second of the background write load during the lag measurement.
const LOAD_COMMITS_PER_SEC: u64 = 500;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut results = Vec::new();
    println!("\n{:<40} {:>12} {:>10} {:>14} {:>10}", "initial sync (2 cores)", "sync", "MB/s", "copy+fsync", "MB/s");
    for rows in [20_000u64, 200_000] {
        let dir = tempfile::tempdir().unwrap();
        let sqld = Sqld::start(&dir.path().join("server"));
        let conn = sqld.connect().await;
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
        conn.execute("INSERT INTO t SELECT value, randomblob(100) FROM generate_series(1, ?1)", [rows as i64]).await.unwrap();

        let started = Instant::now();
        let db = replica(&sqld.url, &dir.path().join("replica.db")).await;
        db.sync().await.unwrap();
        let sync_time = started.elapsed();
        let mut check = db.connect().unwrap().query("SELECT count(*) FROM t", ()).await.unwrap();
        assert_eq!(check.next().await.unwrap().unwrap().get::<u64>(0).unwrap(), rows);
        sqld.stop();

        let data = dir.path().join("server/dbs/default/data");
        let bytes = std::fs::metadata(&data).unwrap().len();
        let started = Instant::now();
        std::fs::copy(&data, dir.path().join("copy")).unwrap();
        std::fs::File::open(dir.path().join("copy")).unwrap().sync_all().unwrap();
        let copy_time = started.elapsed();
        let mb = bytes as f64 / 1e6;
        println!(
            "{:<40} {:>9.1} ms {:>10.1} {:>11.1} ms {:>10.1}",
            format!("{rows} rows ({mb:.1} MB)"),
            ms(sync_time),
            mb / sync_time.as_secs_f64(),
            ms(copy_time),
            mb / copy_time.as_secs_f64()
        );
        results.push(json!({"workload": format!("initial sync, {rows} rows"), "bytes": bytes, "sync_ms": ms(sync_time), "copy_ms": ms(copy_time)}));
    }

    // Steady-state lag: a background writer commits continuously; a probe commits a row and
    // syncs a replica until the row is there.
    let dir = tempfile::tempdir().unwrap();
    let sqld = Sqld::start(&dir.path().join("server"));
    let conn = sqld.connect().await;
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    let db = replica(&sqld.url, &dir.path().join("replica.db")).await;
    db.sync().await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let writer = sqld.connect().await;
        tokio::spawn(async move {
            // Paced: a replica applies each pulled commit with an fsync of its own metadata,
            // so an unpaced single-row writer can outrun any replica.
            let mut pace = tokio::time::interval(Duration::from_micros(1_000_000 / LOAD_COMMITS_PER_SEC));
            let mut id = 1_000_000i64;
            while !stop.load(Ordering::Relaxed) {
                pace.tick().await;
                writer.execute("INSERT INTO t VALUES (?1, randomblob(200))", [id]).await.unwrap();
                id += 1;
            }
            id - 1_000_000
        })
    };
    let replica_conn = db.connect().unwrap();
    let (mut lags, mut commits) = (Vec::new(), Vec::new());
    for probe in 0..200i64 {
        let started = Instant::now();
        conn.execute("INSERT INTO t VALUES (?1, 'probe')", [probe]).await.unwrap();
        let acked = Instant::now();
        commits.push(acked - started);
        loop {
            db.sync().await.unwrap();
            let mut rows = replica_conn.query("SELECT 1 FROM t WHERE id = ?1", [probe]).await.unwrap();
            if rows.next().await.unwrap().is_some() {
                break;
            }
        }
        lags.push(acked.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let background = load.await.unwrap();
    sqld.stop();
    lags.sort();
    commits.sort();
    println!("\n{:<40} {:>12} {:>12} {:>12}", "steady-state lag under load", "p50", "p90", "p99");
    println!("{:<40} {:>9.2} ms {:>9.2} ms {:>9.2} ms", "commit -> visible after sync()", ms(percentile(&lags, 0.5)), ms(percentile(&lags, 0.9)), ms(percentile(&lags, 0.99)));
    println!("{:<40} {:>9.2} ms {:>9.2} ms {:>9.2} ms", "baseline: the commit itself", ms(percentile(&commits, 0.5)), ms(percentile(&commits, 0.9)), ms(percentile(&commits, 0.99)));
    println!("(background load: {LOAD_COMMITS_PER_SEC} commits/s requested, {background} committed meanwhile)");
    results.push(json!({
        "workload": "steady-state lag under a write load",
        "lag_ms": {"p50": ms(percentile(&lags, 0.5)), "p90": ms(percentile(&lags, 0.9)), "p99": ms(percentile(&lags, 0.99))},
        "commit_ms": {"p50": ms(percentile(&commits, 0.5)), "p90": ms(percentile(&commits, 0.9)), "p99": ms(percentile(&commits, 0.99))},
        "background_commits": background,
        "background_commits_per_sec_requested": LOAD_COMMITS_PER_SEC,
    }));
    std::fs::create_dir_all("bench-results").unwrap();
    let path = Path::new("bench-results/sync.json");
    std::fs::write(path, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    println!("\nwritten to {}", path.canonicalize().unwrap().display());
}
