//! Replicas as they see a real `sqld` primary, each figure beside a baseline from the same run.
//!
//! `cargo bench --bench sync` prints a table and writes `bench-results/sync.json`:
//! * initial sync (bootstrap) of 20k and 200k rows with the `libsql` crate's embedded replicas,
//!   over sync v2 and over the older gRPC-web protocol (`SyncProtocol::V1`), beside copying the
//!   (checkpointed) data file with an fsync;
//! * steady-state lag under a paced write load: a commit acknowledged by the primary until it
//!   is visible on a replica after `sync()`, V2 and V1, beside the primary's own commit latency;
//! * the same for this server's follower (`replica::Follower`, the copy a replica keeps) over
//!   gRPC (HTTP/2), read from its file;
//! * the same for this server as a replica (`--primary-grpc-url`), visible through its Hrana
//!   API (its first read bootstraps the copy);
//! * writes through a replica server: a pipeline that inserts a row (forwarded to the
//!   primary) and reads it back on the same stream, beside the same pipeline on the primary;
//! * with `SQLD_UPSTREAM_BIN` naming the libSQL server's binary: the same for that server as a
//!   replica of this one over gRPC (HTTP/2), visible through its Hrana API.

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
    grpc: String,
}

impl Sqld {
    fn start(dir: &Path) -> Sqld {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let grpc = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sqld"))
            .args(["--db-path", dir.to_str().unwrap(), "--http-listen-addr", &addr.to_string()])
            .args(["--grpc-listen-addr", &grpc.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "sqld did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        Sqld { child, url: format!("http://{addr}"), grpc: format!("http://{grpc}") }
    }

    async fn connect(&self) -> libsql::Connection {
        remote(&self.url).await
    }

    fn stop(mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let _ = self.child.wait();
    }
}

async fn remote(url: &str) -> libsql::Connection {
    libsql::Builder::new_remote(url.to_owned(), String::new())
        .connector(hyper::client::HttpConnector::new())
        .build()
        .await
        .unwrap()
        .connect()
        .unwrap()
}

/// The replicas measured: the `libsql` crate's embedded replicas over each protocol, and
/// (opt-in) the libSQL server as a replica server.
#[derive(Clone, Copy)]
enum Kind {
    V2,
    V1,
    Follower,
    Replica,
    Upstream,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::V2 => "embedded replica, sync v2",
            Kind::V1 => "embedded replica, gRPC-web (V1)",
            Kind::Follower => "this server's follower, gRPC",
            Kind::Replica => "this server as a replica, gRPC",
            Kind::Upstream => "libSQL server replica, gRPC",
        }
    }
}

/// A replica of `sqld` of one kind, in `dir`.
enum Replica {
    Embedded(libsql::Database, libsql::Connection),
    Server(Child, libsql::Connection, String),
    /// The copy is read from its file.
    Follower(libsql_server::replica::Follower, std::path::PathBuf),
}

impl Replica {
    async fn open(kind: Kind, sqld: &Sqld, dir: &Path) -> Replica {
        let path = dir.join("replica.db");
        let db = match kind {
            Kind::V2 => libsql::Builder::new_synced_database(path, sqld.url.clone(), String::new())
                .connector(hyper::client::HttpConnector::new())
                .build()
                .await
                .unwrap(),
            Kind::V1 => libsql::Builder::new_remote_replica(path, sqld.url.clone(), String::new())
                .connector(hyper::client::HttpConnector::new())
                .sync_protocol(libsql::SyncProtocol::V1)
                .build()
                .await
                .unwrap(),
            Kind::Follower => {
                let channel = tonic::transport::Endpoint::from_shared(sqld.grpc.clone()).unwrap().connect_lazy();
                let ns = libsql_server::namespace::NamespaceName::default_namespace();
                let follower = libsql_server::replica::Follower::start(channel, ns, None, dir.to_owned());
                return Replica::Follower(follower, dir.join("data"));
            }
            Kind::Replica => return Replica::server(env!("CARGO_BIN_EXE_sqld"), sqld, dir).await,
            Kind::Upstream => return Replica::server(&std::env::var("SQLD_UPSTREAM_BIN").unwrap(), sqld, dir).await,
        };
        let conn = db.connect().unwrap();
        Replica::Embedded(db, conn)
    }

    /// A replica server (`bin`, this server's or the libSQL server's) of `sqld` in `dir`.
    async fn server(bin: &str, sqld: &Sqld, dir: &Path) -> Replica {
        let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let child = Command::new(bin)
            .args(["--db-path", dir.join("replica-server").to_str().unwrap(), "--http-listen-addr", &addr.to_string()])
            .args(["--primary-grpc-url", &sqld.grpc])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while std::net::TcpStream::connect(addr).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let url = format!("http://{addr}");
        Replica::Server(child, remote(&url).await, url)
    }

    /// Whether the replica (synced first, if embedded) answers `sql` with a first row whose
    /// first value is `expected`.
    async fn sees(&self, sql: &str, expected: i64) -> bool {
        let conn = match self {
            Replica::Embedded(db, conn) => {
                db.sync().await.unwrap();
                conn
            }
            Replica::Server(_, conn, _) => conn,
            Replica::Follower(_, data) => {
                let (data, sql) = (data.clone(), sql.to_owned());
                return tokio::task::spawn_blocking(move || {
                    use libsql_sys::rusqlite::{Connection, OpenFlags};
                    let Ok(conn) = Connection::open_with_flags(data, OpenFlags::SQLITE_OPEN_READ_ONLY) else { return false };
                    conn.query_row(&sql, [], |r| r.get::<_, i64>(0)).ok() == Some(expected)
                })
                .await
                .unwrap();
            }
        };
        let Ok(mut rows) = conn.query(sql, ()).await else { return false };
        matches!(rows.next().await, Ok(Some(row)) if row.get::<i64>(0).ok() == Some(expected))
    }

    fn stop(self) {
        match self {
            Replica::Server(mut child, ..) => {
                let _ = child.kill();
                let _ = child.wait();
            }
            // Dropping it stops its task.
            Replica::Follower(follower, _) => drop(follower),
            Replica::Embedded(..) => {}
        }
    }
}

fn kinds() -> Vec<Kind> {
    let mut kinds = vec![Kind::V2, Kind::V1, Kind::Follower, Kind::Replica];
    if std::env::var("SQLD_UPSTREAM_BIN").is_ok() {
        kinds.push(Kind::Upstream);
    } else {
        println!("(set SQLD_UPSTREAM_BIN to the libSQL server's binary to measure it as a replica too)");
    }
    kinds
}

/// Sends one pipeline to `url`: an INSERT of row `id`, then a read of it on the same stream;
/// whether the read found it.
async fn write_and_read(url: &str, id: i64) -> bool {
    let body = json!({"requests": [
        {"type": "execute", "stmt": {"sql": format!("INSERT INTO t VALUES ({id}, x'01')")}},
        {"type": "execute", "stmt": {"sql": format!("SELECT count(*) FROM t WHERE id = {id}")}},
        {"type": "close"},
    ]});
    let request = hyper::Request::post(format!("{url}/v2/pipeline")).body(hyper::Body::from(body.to_string())).unwrap();
    let response = hyper::Client::new().request(request).await.unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&hyper::body::to_bytes(response.into_body()).await.unwrap()).unwrap();
    answer["results"][1]["response"]["result"]["rows"][0][0]["value"] == "1"
}

/// Commits per second of the background write load during the lag measurement.
const LOAD_COMMITS_PER_SEC: u64 = 500;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A table row: `what`, then the p50, p90 and p99 of the sorted `d`.
fn print_row(what: &str, d: &[Duration]) {
    println!("{:<52} {:>9.2} ms {:>9.2} ms {:>9.2} ms", what, ms(percentile(d, 0.5)), ms(percentile(d, 0.9)), ms(percentile(d, 0.99)));
}

/// The p50, p90 and p99 of the sorted `d`, in ms, for the JSON.
fn percentiles_ms(d: &[Duration]) -> serde_json::Value {
    json!({"p50": ms(percentile(d, 0.5)), "p90": ms(percentile(d, 0.9)), "p99": ms(percentile(d, 0.99))})
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut results = Vec::new();
    let kinds = kinds();
    println!("\n{:<52} {:>12} {:>10} {:>14} {:>10}", "initial sync (2 cores)", "sync", "MB/s", "copy+fsync", "MB/s");
    for rows in [20_000u64, 200_000] {
        let dir = tempfile::tempdir().unwrap();
        let sqld = Sqld::start(&dir.path().join("server"));
        let conn = sqld.connect().await;
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
        conn.execute("INSERT INTO t SELECT value, randomblob(100) FROM generate_series(1, ?1)", [rows as i64]).await.unwrap();
        let mut times = Vec::new();
        for kind in &kinds {
            let replica_dir = tempfile::tempdir().unwrap();
            let started = Instant::now();
            let replica = Replica::open(*kind, &sqld, replica_dir.path()).await;
            while !replica.sees("SELECT count(*) FROM t", rows as i64).await {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            times.push((*kind, started.elapsed()));
            replica.stop();
        }
        sqld.stop();

        let data = dir.path().join("server/dbs/default/data");
        let bytes = std::fs::metadata(&data).unwrap().len();
        let started = Instant::now();
        std::fs::copy(&data, dir.path().join("copy")).unwrap();
        std::fs::File::open(dir.path().join("copy")).unwrap().sync_all().unwrap();
        let copy_time = started.elapsed();
        let mb = bytes as f64 / 1e6;
        for (kind, sync_time) in times {
            println!(
                "{:<52} {:>9.1} ms {:>10.1} {:>11.1} ms {:>10.1}",
                format!("{rows} rows ({mb:.1} MB), {}", kind.name()),
                ms(sync_time),
                mb / sync_time.as_secs_f64(),
                ms(copy_time),
                mb / copy_time.as_secs_f64()
            );
            results.push(json!({"workload": format!("initial sync, {rows} rows"), "replica": kind.name(), "bytes": bytes, "sync_ms": ms(sync_time), "copy_ms": ms(copy_time)}));
        }
    }

    // Steady-state lag: a background writer commits continuously; a probe commits a row and
    // polls a replica until the row is there.
    println!("\n{:<52} {:>12} {:>12} {:>12}", "steady-state lag under load", "p50", "p90", "p99");
    for kind in &kinds {
        let dir = tempfile::tempdir().unwrap();
        let sqld = Sqld::start(&dir.path().join("server"));
        let conn = sqld.connect().await;
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
        let replica = Replica::open(*kind, &sqld, dir.path()).await;
        while !replica.sees("SELECT count(*) FROM t", 0).await {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let load = {
            let stop = stop.clone();
            let writer = sqld.connect().await;
            tokio::spawn(async move {
                // Paced: a replica applies each pulled commit with an fsync of its own
                // metadata, so an unpaced single-row writer can outrun any replica.
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
        let (mut lags, mut commits) = (Vec::new(), Vec::new());
        for probe in 0..200i64 {
            let started = Instant::now();
            conn.execute("INSERT INTO t VALUES (?1, 'probe')", [probe]).await.unwrap();
            let acked = Instant::now();
            commits.push(acked - started);
            let sql = format!("SELECT count(*) FROM t WHERE id = {probe}");
            while !replica.sees(&sql, 1).await {}
            lags.push(acked.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        let background = load.await.unwrap();
        replica.stop();
        sqld.stop();
        lags.sort();
        commits.sort();
        print_row(&format!("commit -> visible, {}", kind.name()), &lags);
        print_row("  baseline: the commit itself", &commits);
        println!("  (background load: {LOAD_COMMITS_PER_SEC} commits/s requested, {background} committed meanwhile)");
        results.push(json!({
            "workload": "steady-state lag under a write load",
            "replica": kind.name(),
            "lag_ms": percentiles_ms(&lags),
            "commit_ms": percentiles_ms(&commits),
            "background_commits": background,
            "background_commits_per_sec_requested": LOAD_COMMITS_PER_SEC,
        }));
    }
    // Writes through a replica server: one pipeline, an INSERT (forwarded to the primary) and
    // a read of it on the same stream (which waits until the replica's copy has it), beside
    // the same pipeline sent to the primary.
    println!("\n{:<52} {:>12} {:>12} {:>12}", "write through a replica, read back (same stream)", "p50", "p90", "p99");
    for kind in kinds.iter().filter(|k| matches!(k, Kind::Replica | Kind::Upstream)) {
        let dir = tempfile::tempdir().unwrap();
        let sqld = Sqld::start(&dir.path().join("server"));
        sqld.connect().await.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
        let replica = Replica::open(*kind, &sqld, dir.path()).await;
        while !replica.sees("SELECT count(*) FROM t", 0).await {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let Replica::Server(_, _, replica_url) = &replica else { unreachable!("only replica servers are measured here") };
        let replica_url = replica_url.clone();
        let (mut through, mut direct, mut read_back) = (Vec::new(), Vec::new(), 0);
        for probe in 0..200i64 {
            let started = Instant::now();
            read_back += write_and_read(&replica_url, probe).await as usize;
            through.push(started.elapsed());
            let started = Instant::now();
            assert!(write_and_read(&sqld.url, 10_000 + probe).await, "the primary's stream did not read its own write");
            direct.push(started.elapsed());
        }
        replica.stop();
        sqld.stop();
        through.sort();
        direct.sort();
        print_row(&format!("through {}", kind.name()), &through);
        print_row("  baseline: the same pipeline on the primary", &direct);
        println!("  (the replica's stream read its own write back in {read_back} of 200)");
        results.push(json!({
            "workload": "write through a replica, read back on the same stream",
            "replica": kind.name(),
            "through_ms": percentiles_ms(&through),
            "primary_ms": percentiles_ms(&direct),
            "read_back_of_200": read_back,
        }));
    }

    std::fs::create_dir_all("bench-results").unwrap();
    let path = Path::new("bench-results/sync.json");
    std::fs::write(path, serde_json::to_string_pretty(&results).unwrap()).unwrap();
    println!("\nwritten to {}", path.canonicalize().unwrap().display());
}
