//! What the repair calls cost, against a real `sqld`, each beside a baseline of the same run.
//!
//! For a namespace of 20k rows, 200k rows and about 1 GiB (`REPAIR_BENCH_GIB` changes the
//! last): `reset-replication` and `rebuild-data` beside copying the data file with an fsync
//! (each 20 times, 5 at the largest size, so a p95 is more than the slowest run), `integrity-check` quick and full; point-read p99 of the namespace
//! being reset and of a bystander namespace, idle, during back-to-back resets, and during two
//! baselines: back-to-back copies of the data file (the I/O a rebuild of it makes at least)
//! and back-to-back 4 KB durable writes (the least any durable change makes); and the longest
//! write stall on the namespace while it is reset.
//!
//! `cargo bench --bench repair` prints a table and writes `bench-results/repair.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;

use common::{close, int, spawn_sqld, stmt, stop_sqld, Http};

struct Sqld {
    child: Child,
    user: String,
    admin: String,
    dir: PathBuf,
}

impl Sqld {
    fn start(dir: &Path) -> Sqld {
        let (child, user, admin) = spawn_sqld(dir, &["--enable-namespaces"]);
        Sqld { child, user: format!("http://{user}/v2/pipeline"), admin: format!("http://{admin}"), dir: dir.join("dbs") }
    }

    fn http(&self, ns: &str) -> Http {
        Http::with_namespace(self.user.clone(), ns)
    }

    /// An admin POST; its status and JSON, and how long it took.
    async fn admin(&self, path: &str, body: &str) -> (u16, Value, Duration) {
        let started = Instant::now();
        let request = hyper::Request::post(format!("{}{path}", self.admin)).body(hyper::Body::from(body.to_owned())).unwrap();
        let response = hyper::Client::new().request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = hyper::body::to_bytes(response.into_body()).await.unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null), started.elapsed())
    }

    fn stop(self) {
        stop_sqld(self.child);
    }
}

async fn exec(http: &Http, sql: &str) {
    let answer = http.pipeline(vec![stmt(sql, vec![]), close()]).await;
    assert_eq!(answer["results"][0]["type"], "ok", "{sql}: {answer}");
}

/// `rows` rows of `row_bytes` each into namespace `ns`, a few MB a statement.
async fn fill(sqld: &Sqld, ns: &str, rows: u64, row_bytes: u64) {
    let (status, body, _) = sqld.admin(&format!("/v1/namespaces/{ns}/create"), "").await;
    assert_eq!(status, 200, "{body}");
    let http = sqld.http(ns);
    exec(&http, "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)").await;
    let per = (4_000_000 / row_bytes).max(1);
    let mut done = 0;
    while done < rows {
        let n = per.min(rows - done);
        exec(&http, &format!("INSERT INTO t SELECT {done} + value, randomblob({row_bytes}) FROM generate_series(1, {n})")).await;
        done += n;
    }
    let (status, body, _) = sqld.admin(&format!("/v1/namespaces/{ns}/checkpoint"), "").await;
    assert_eq!(status, 200, "{body}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Copies the data file with an fsync: what any rebuild of it costs at least.
fn copy_with_fsync(data: &Path, to: &Path) -> Duration {
    let started = Instant::now();
    std::fs::copy(data, to).unwrap();
    std::fs::File::open(to).unwrap().sync_all().unwrap();
    let took = started.elapsed();
    std::fs::remove_file(to).unwrap();
    took
}

/// Point reads on `ns` until `stop`; their latencies in ms.
async fn read_loop(http: Http, rows: u64, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut latencies = Vec::new();
    let mut key = 7u64;
    while !stop.load(Ordering::Relaxed) {
        key = (key * 6364136223846793005 + 1442695040888963407) % rows.max(1);
        let started = Instant::now();
        http.pipeline(vec![stmt("SELECT length(v) FROM t WHERE id = ?", vec![int(key as i64 + 1)]), close()]).await;
        latencies.push(ms(started.elapsed()));
    }
    latencies
}

/// What runs while the reads are timed.
enum During<'a> {
    Nothing,
    /// Back-to-back admin calls to this path.
    Calls(&'a str),
    /// Back-to-back copies (with fsync) of this data file to that path: the I/O any rebuild
    /// of the file makes at least, as a baseline for the calls'.
    Copies(&'a Path, &'a Path),
    /// Back-to-back 4 KB writes, each made durable (fsync), to this path: the least I/O any
    /// durable change makes, as a floor for what the machine's I/O costs readers.
    DurableWrites(&'a Path),
}

/// Writes 4 KB at the start of `path` and fsyncs it.
fn durable_write(path: &Path) {
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[7u8; 4096], 0).unwrap();
    file.sync_all().unwrap();
}

/// Read p99 of `a` and of `bystander` over `window`, while `during` runs; and how many
/// calls or copies ran.
async fn read_p99s(sqld: &Sqld, rows: u64, during: During<'_>, window: Duration) -> (f64, f64, usize) {
    let stop = Arc::new(AtomicBool::new(false));
    let mine = tokio::spawn(read_loop(sqld.http("a"), rows, stop.clone()));
    let other = tokio::spawn(read_loop(sqld.http("bystander"), 20_000, stop.clone()));
    let started = Instant::now();
    let mut runs = 0;
    while started.elapsed() < window {
        match during {
            During::Calls(path) => {
                let (status, body, _) = sqld.admin(path, "").await;
                assert_eq!(status, 200, "{body}");
            }
            During::Copies(data, to) => {
                let (data, to) = (data.to_owned(), to.to_owned());
                tokio::task::spawn_blocking(move || copy_with_fsync(&data, &to)).await.unwrap();
            }
            During::DurableWrites(path) => {
                let path = path.to_owned();
                tokio::task::spawn_blocking(move || durable_write(&path)).await.unwrap();
            }
            During::Nothing => tokio::time::sleep(Duration::from_millis(50)).await,
        }
        runs += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let (mine, other) = (mine.await.unwrap(), other.await.unwrap());
    (percentile(mine, 0.99), percentile(other, 0.99), runs)
}

/// The longest single-row insert on `a` while one reset runs.
async fn write_stall_during_reset(sqld: &Sqld) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (http, stop) = (sqld.http("a"), stop.clone());
        tokio::spawn(async move {
            let mut longest: f64 = 0.0;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                exec(&http, "INSERT INTO t (v) VALUES (randomblob(100))").await;
                longest = longest.max(ms(started.elapsed()));
            }
            longest
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body, _) = sqld.admin("/v1/namespaces/a/reset-replication", "").await;
    assert_eq!(status, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap()
}

async fn run(name: &str, rows: u64, row_bytes: u64) -> Value {
    let tmp = tempfile::tempdir().unwrap();
    let sqld = Sqld::start(tmp.path());
    fill(&sqld, "a", rows, row_bytes).await;
    fill(&sqld, "bystander", 20_000, 200).await;
    let data = sqld.dir.join("a/data");
    let data_mb = std::fs::metadata(&data).unwrap().len() as f64 / 1e6;
    eprintln!("{name}: {data_mb:.0} MB");

    let samples = if data_mb < 200.0 { 20 } else { 5 };
    let copies: Vec<f64> = (0..samples).map(|_| ms(copy_with_fsync(&data, &tmp.path().join("copy")))).collect();
    let call = |path: &'static str, n: usize| {
        let sqld = &sqld;
        async move {
            let mut took = Vec::new();
            for _ in 0..n {
                let (status, body, elapsed) = sqld.admin(path, "").await;
                assert_eq!(status, 200, "{path}: {body}");
                took.push(ms(elapsed));
            }
            took
        }
    };
    let resets = call("/v1/namespaces/a/reset-replication", samples).await;
    let rebuilds = call("/v1/namespaces/a/rebuild-data", samples).await;
    let checks = |full: bool| {
        let sqld = &sqld;
        async move {
            let mut took = Vec::new();
            for _ in 0..3 {
                let (status, body, elapsed) = sqld.admin("/v1/namespaces/a/integrity-check", &json!({ "full": full }).to_string()).await;
                assert_eq!(status, 200, "{body}");
                assert_eq!(body["repair"], "none", "{body}");
                took.push(ms(elapsed));
            }
            took
        }
    };
    let quick = checks(false).await;
    let full = checks(true).await;
    let window = Duration::from_secs(4);
    // What the calls above wrote is on the disk before reads are timed, and idle is timed
    // before and after the busy phases: the lower p99 of each is the baseline.
    tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await.unwrap();
    let (idle_a, idle_b, _) = read_p99s(&sqld, rows, During::Nothing, window).await;
    let (busy_a, busy_b, resets_during) = read_p99s(&sqld, rows, During::Calls("/v1/namespaces/a/reset-replication"), window).await;
    let copy_to = tmp.path().join("copy");
    let (copying_a, copying_b, _) = read_p99s(&sqld, rows, During::Copies(&data, &copy_to), window).await;
    let small = tmp.path().join("durable-writes");
    let (syncing_a, syncing_b, _) = read_p99s(&sqld, rows, During::DurableWrites(&small), window).await;
    let (idle_after_a, idle_after_b, _) = read_p99s(&sqld, rows, During::Nothing, window).await;
    let (idle_a, idle_b) = (idle_a.min(idle_after_a), idle_b.min(idle_after_b));
    let stall = write_stall_during_reset(&sqld).await;
    sqld.stop();
    let copy_p95 = percentile(copies.clone(), 0.95);
    json!({
        "namespace": name,
        "data_mb": data_mb,
        "copy_fsync_p95_ms": copy_p95,
        "reset_p95_ms": percentile(resets.clone(), 0.95),
        "reset_over_copy": percentile(resets.clone(), 0.95) / copy_p95,
        "rebuild_p95_ms": percentile(rebuilds.clone(), 0.95),
        "rebuild_over_copy": percentile(rebuilds.clone(), 0.95) / copy_p95,
        "check_quick_median_ms": percentile(quick, 0.5),
        "check_full_median_ms": percentile(full, 0.5),
        "read_p99_idle_ms": idle_a,
        "read_p99_during_resets_ms": busy_a,
        "bystander_read_p99_idle_ms": idle_b,
        "bystander_read_p99_during_resets_ms": busy_b,
        "resets_per_s_during_reads": resets_during as f64 / window.as_secs_f64(),
        "read_p99_during_copies_ms": copying_a,
        "bystander_read_p99_during_copies_ms": copying_b,
        "read_p99_during_durable_writes_ms": syncing_a,
        "bystander_read_p99_during_durable_writes_ms": syncing_b,
        "longest_write_stall_ms": stall,
        "all": {"copies": copies, "resets": resets, "rebuilds": rebuilds},
    })
}

fn main() {
    let gib: f64 = std::env::var("REPAIR_BENCH_GIB").ok().and_then(|s| s.parse().ok()).unwrap_or(1.0);
    let sizes = [("20k rows", 20_000, 200), ("200k rows", 200_000, 200), ("~1 GiB", (gib * 1073741824.0 / 4000.0) as u64, 4000)];
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let results: Vec<Value> = sizes.iter().map(|(name, rows, bytes)| rt.block_on(run(name, *rows, *bytes))).collect();

    let mut out = std::io::stdout().lock();
    writeln!(out, "\nrepair calls, client-side elapsed (2-core VM); baseline: copy + fsync of the data file").unwrap();
    writeln!(
        out,
        "{:<10} {:>7} {:>9} {:>9} {:>6} {:>11} {:>6} {:>8} {:>8} {:>9}",
        "size", "MB", "copy p95", "reset p95", "×copy", "rebuild p95", "×copy", "quick", "full", "w stall"
    )
    .unwrap();
    for r in &results {
        let f = |k: &str| r[k].as_f64().unwrap();
        writeln!(
            out,
            "{:<10} {:>7.0} {:>9.1} {:>9.1} {:>6.2} {:>11.1} {:>6.2} {:>8.1} {:>8.1} {:>9.1}",
            r["namespace"].as_str().unwrap(),
            f("data_mb"),
            f("copy_fsync_p95_ms"),
            f("reset_p95_ms"),
            f("reset_over_copy"),
            f("rebuild_p95_ms"),
            f("rebuild_over_copy"),
            f("check_quick_median_ms"),
            f("check_full_median_ms"),
            f("longest_write_stall_ms"),
        )
        .unwrap();
    }
    writeln!(out, "\npoint-read p99 (ms) of the namespace / a bystander: idle, during back-to-back resets, and two I/O baselines").unwrap();
    writeln!(
        out,
        "{:<10} {:>13} {:>13} {:>8} {:>13} {:>13} {:>13}",
        "size", "idle", "resets", "resets/s", "×idle", "data copies", "4 KB fsyncs"
    )
    .unwrap();
    for r in &results {
        let f = |k: &str| r[k].as_f64().unwrap();
        let pair = |a: f64, b: f64| format!("{a:.2} / {b:.2}");
        let idle = (f("read_p99_idle_ms"), f("bystander_read_p99_idle_ms"));
        let resets = (f("read_p99_during_resets_ms"), f("bystander_read_p99_during_resets_ms"));
        writeln!(
            out,
            "{:<10} {:>13} {:>13} {:>8.0} {:>13} {:>13} {:>13}",
            r["namespace"].as_str().unwrap(),
            pair(idle.0, idle.1),
            pair(resets.0, resets.1),
            f("resets_per_s_during_reads"),
            pair(resets.0 / idle.0, resets.1 / idle.1),
            pair(f("read_p99_during_copies_ms"), f("bystander_read_p99_during_copies_ms")),
            pair(f("read_p99_during_durable_writes_ms"), f("bystander_read_p99_during_durable_writes_ms")),
        )
        .unwrap();
    }
    std::fs::create_dir_all("bench-results").unwrap();
    let path = Path::new("bench-results/repair.json");
    std::fs::write(path, serde_json::to_string_pretty(&json!({"results": results})).unwrap()).unwrap();
    writeln!(out, "\nwritten to {}", path.canonicalize().unwrap().display()).unwrap();
}
