//! What the isolation, limits and authentication cost: point reads and single-row inserts over
//! HTTP against this build's `sqld`, beside a baseline `sqld` binary in the same run (a build
//! from before the limits, given as `SQLD_BASELINE_BIN`; without it, this build again with
//! every limit flag at its loosest, which leaves the authorizer and the progress handler in
//! place). With `LIMITS_BENCH_AUTH=1` the two sides are this build with authentication off
//! and on (a key file, and a JWT on every request).
//!
//! `cargo bench --bench limits` prints a table and writes `bench-results/limits.json`.
//! With `LIMITS_BENCH_CALLGRIND=1` it counts instructions instead (valgrind's callgrind; the
//! same count for the same binary and requests, whatever else the machine does): each server
//! answers 200 and then 1,200 requests of each kind, and the difference over 1,000 is the
//! cost of one request (`bench-results/limits-instructions.json`).
//! The two servers run in alternating rounds (each first in every other one), each on a fresh
//! data directory; the table shows
//! each side's median round, as throughput and as the server process's CPU time per request
//! (user + system, from `/proc`), which the machine's other load disturbs far less.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

mod common;

use common::{close, cpu_us, int, stmt, Http};

const ROUNDS: usize = 6;
const INSERTS: usize = 2_000;
const READ_CLIENTS: usize = 8;
const READS_PER_CLIENT: usize = 2_000;
const KEYS: i64 = 2_000;

/// Every limit flag at its loosest.
const LOOSE: &[&str] = &[
    "--statement-timeout-ms",
    "0",
    "--txn-timeout-s",
    "0",
    "--max-concurrent-requests",
    "100000",
    "--max-concurrent-connections",
    "100000",
    "--max-response-size",
    "1GB",
    "--max-total-response-size",
    "100GB",
];

struct Side {
    name: String,
    bin: String,
    args: Vec<String>,
    /// The token every request carries.
    token: Option<String>,
    inserts: Vec<f64>,
    reads: Vec<f64>,
    insert_cpu_us: Vec<f64>,
    read_cpu_us: Vec<f64>,
}

impl Side {
    fn new(name: String, bin: String, args: &[&str]) -> Self {
        let args = args.iter().map(|a| a.to_string()).collect();
        Side { name, bin, args, token: None, inserts: vec![], reads: vec![], insert_cpu_us: vec![], read_cpu_us: vec![] }
    }
}

/// What one round measured.
struct Round {
    inserts: f64,
    reads: f64,
    insert_cpu_us: f64,
    read_cpu_us: f64,
}

fn main() {
    let this = env!("CARGO_BIN_EXE_sqld").to_owned();
    let keys = tempfile::tempdir().unwrap();
    let mut sides = if std::env::var("LIMITS_BENCH_AUTH").is_ok() {
        let (key_file, token) = auth_key(keys.path());
        let mut on = Side::new("this build, auth on".into(), this.clone(), &["--auth-jwt-key-file", &key_file]);
        on.token = Some(token);
        [Side::new("this build, auth off".into(), this, &[]), on]
    } else {
        let baseline = match std::env::var("SQLD_BASELINE_BIN") {
            Ok(bin) => Side::new(format!("baseline ({bin})"), bin, &[]),
            Err(_) => Side::new("this build, limits loosest".into(), this.clone(), LOOSE),
        };
        [baseline, Side::new("this build, defaults".into(), this, &[])]
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if std::env::var("LIMITS_BENCH_CALLGRIND").is_ok() {
        return rt.block_on(count_instructions(&sides));
    }
    for round in 0..ROUNDS {
        // Each side goes first in every other round, so neither gains from the order.
        let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let side = &mut sides[i];
            let r = rt.block_on(measure(side));
            eprintln!(
                "round {round}: {}: {:.0} inserts/s ({:.1} us CPU each), {:.0} reads/s ({:.1} us CPU each)",
                side.name, r.inserts, r.insert_cpu_us, r.reads, r.read_cpu_us
            );
            side.inserts.push(r.inserts);
            side.reads.push(r.reads);
            side.insert_cpu_us.push(r.insert_cpu_us);
            side.read_cpu_us.push(r.read_cpu_us);
        }
    }
    let [base, this] = &sides;
    println!("\n{:<40} {:>16} {:>16} {:>8}", "workload (2 cores, median of rounds)", "baseline", "this build", "ratio");
    let rows = [
        ("single-row inserts, sequential", "tx/s", median(&base.inserts), median(&this.inserts)),
        ("  server CPU per insert", "us", median(&base.insert_cpu_us), median(&this.insert_cpu_us)),
        ("point reads, 8 clients", "q/s", median(&base.reads), median(&this.reads)),
        ("  server CPU per read", "us", median(&base.read_cpu_us), median(&this.read_cpu_us)),
    ];
    for (workload, unit, b, t) in rows {
        println!("{workload:<40} {b:>12.1} {unit:<3} {t:>12.1} {unit:<3} {:>7.1}%", 100.0 * t / b);
    }
    println!("baseline: {}", base.name);
    let json = json!({
        "baseline": base.name,
        "rounds": ROUNDS,
        "workloads": rows.iter().map(|(w, u, b, t)| json!({"workload": w, "unit": u, "baseline": b, "this": t, "ratio": t / b})).collect::<Vec<_>>(),
        "all_rounds": sides
            .iter()
            .map(|s| json!({"side": s.name, "inserts": s.inserts, "reads": s.reads, "insert_cpu_us": s.insert_cpu_us, "read_cpu_us": s.read_cpu_us}))
            .collect::<Vec<_>>(),
    });
    std::fs::create_dir_all("bench-results").unwrap();
    let path = std::path::Path::new("bench-results/limits.json");
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nwritten to {}", path.canonicalize().unwrap().display());
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Starts `bin` (run by `launcher`, valgrind say, when given) on `dir` and a free port, and
/// waits (bounded) until it answers.
async fn start(launcher: Option<Command>, side: &Side, dir: &std::path::Path) -> (Child, Http) {
    let (bin, args) = (&side.bin, &side.args);
    let addr: SocketAddr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let slow = launcher.is_some();
    let mut command = match launcher {
        Some(mut launcher) => {
            launcher.arg(bin);
            launcher
        }
        None => Command::new(bin),
    };
    let child = command
        .arg("--db-path")
        .arg(dir.join("data"))
        .args(["--http-listen-addr", &addr.to_string()])
        .args(args)
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .expect("starting sqld (and valgrind, for instruction counts)");
    let http = Http::new(format!("http://{addr}/v2/pipeline")).with_token(side.token.clone());
    let deadline = Instant::now() + Duration::from_secs(if slow { 120 } else { 30 });
    while http.try_pipeline(vec![stmt("SELECT 1", vec![]), close()]).await.is_none() {
        assert!(Instant::now() < deadline, "sqld did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (child, http)
}

/// Starts `bin` on a fresh directory, runs both workloads, stops it.
async fn measure(side: &Side) -> Round {
    let dir = tempfile::tempdir().unwrap();
    let (child, http) = start(None, side, dir.path()).await;
    let server = Server(child);
    let http = Arc::new(http);
    http.pipeline(vec![stmt("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB)", vec![]), close()]).await;

    let pid = server.0.id();
    let cpu_before = cpu_us(pid);
    let started = Instant::now();
    for i in 0..INSERTS as i64 {
        http.pipeline(vec![stmt("INSERT INTO kv VALUES (?, randomblob(100))", vec![int(i)]), close()]).await;
    }
    let inserts = INSERTS as f64 / started.elapsed().as_secs_f64();
    let insert_cpu_us = (cpu_us(pid) - cpu_before) / INSERTS as f64;

    let cpu_before = cpu_us(pid);
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
    let reads = (READ_CLIENTS * READS_PER_CLIENT) as f64 / started.elapsed().as_secs_f64();
    let read_cpu_us = (cpu_us(pid) - cpu_before) / (READ_CLIENTS * READS_PER_CLIENT) as f64;
    drop(server);
    Round { inserts, reads, insert_cpu_us, read_cpu_us }
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Instructions per request of each side, by callgrind (see the module's comment).
async fn count_instructions(sides: &[Side; 2]) {
    let mut table = Vec::new();
    for (workload, sql) in
        [("point read", "SELECT v FROM kv WHERE k = 42"), ("single-row insert", "INSERT INTO kv (v) VALUES (randomblob(100))")]
    {
        let mut per_side = Vec::new();
        for side in sides {
            let few = instructions(side, sql, 200).await;
            let many = instructions(side, sql, 1_200).await;
            let per_request = many.saturating_sub(few) as f64 / 1_000.0;
            eprintln!("{workload}: {}: {per_request:.0} instructions a request", side.name);
            per_side.push(per_request);
        }
        table.push((workload, per_side[0], per_side[1]));
    }
    println!("\n{:<24} {:>14} {:>14} {:>8}", "instructions / request", "baseline", "this build", "ratio");
    for (workload, base, this) in &table {
        println!("{workload:<24} {base:>14.0} {this:>14.0} {:>7.1}%", 100.0 * this / base);
    }
    println!("baseline: {}", sides[0].name);
    let json = json!({
        "baseline": sides[0].name,
        "workloads": table.iter().map(|(w, b, t)| json!({"workload": w, "baseline": b, "this": t, "ratio": t / b})).collect::<Vec<_>>(),
    });
    std::fs::create_dir_all("bench-results").unwrap();
    let path = std::path::Path::new("bench-results/limits-instructions.json");
    std::fs::write(path, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    println!("\nwritten to {}", path.canonicalize().unwrap().display());
}

/// Instructions `bin` runs (start-up and shutdown included) to answer `n` requests of `sql`.
async fn instructions(side: &Side, sql: &str, n: usize) -> u64 {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("callgrind.out");
    let mut valgrind = Command::new("valgrind");
    valgrind.arg("--tool=callgrind").arg(format!("--callgrind-out-file={}", out.display())).stderr(Stdio::null());
    let (mut child, http) = start(Some(valgrind), side, dir.path()).await;
    http.pipeline(vec![
        stmt("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB)", vec![]),
        stmt("INSERT INTO kv SELECT value, randomblob(100) FROM generate_series(1, 2000)", vec![]),
        close(),
    ])
    .await;
    for _ in 0..n {
        let answer = http.pipeline(vec![stmt(sql, vec![]), close()]).await;
        assert_eq!(answer["results"][0]["type"], "ok");
    }
    // A graceful stop, so callgrind writes its counts.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait().unwrap();
    let counts = std::fs::read_to_string(&out).unwrap();
    counts.lines().find_map(|l| l.strip_prefix("totals: ")).and_then(|t| t.trim().parse().ok()).expect("callgrind totals")
}

/// A key file in `dir` for a new Ed25519 key pair, and a token it verifies (read-write, every
/// namespace, no expiry): what an operator's issuer hands a client.
fn auth_key(dir: &std::path::Path) -> (String, String) {
    use ring::signature::KeyPair;
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let public = libsql_server::auth::PublicKey(pair.public_key().as_ref().try_into().unwrap());
    let path = dir.join("jwt.pem");
    std::fs::write(&path, libsql_server::auth::keys::to_pem(&public)).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ed_der(pkcs8.as_ref());
    let token = jsonwebtoken::encode(&jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA), &json!({"a": "rw"}), &key).unwrap();
    (path.to_str().unwrap().to_owned(), token)
}
