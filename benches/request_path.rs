//! The request path's cost: this build's `sqld` beside the simplest server on the same crates
//! (`minimal_server.rs`, run from this same binary), under the same HTTP load from `wrk`, in one
//! run. Workloads through `POST /v2/pipeline` (an `execute` and a `close`): point reads
//! (`SELECT v FROM kv WHERE k = ?`, random keys of 10,000), single-row inserts, and a 90/10
//! mix. Both servers make a commit durable with one fsync.
//!
//! `cargo bench --bench request_path` (needs `wrk`: `apt-get install wrk`) prints a table and
//! writes `bench-results/request_path.json`. Each round starts both servers on fresh data and
//! runs every workload against each, alternating which goes first; the table shows each side's
//! median round: req/s, p50 and p99 (wrk's), and the server process's CPU time per request
//! (user + system, from `/proc`). `REQUEST_PATH_ROUNDS` (3), `REQUEST_PATH_SECONDS` (8),
//! `REQUEST_PATH_CONNECTIONS` (32) change the run; wrk uses 2 threads. `REQUEST_PATH_SQLD`
//! names another `sqld` binary to measure instead of this build's (an older build, say).

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
mod minimal_server;

use common::{close, cpu_us, stmt, Http};

const KEYS: i64 = 10_000;
/// Set (to `address,database`) in the child process that runs the minimal server.
const MINIMAL_ROLE: &str = "REQUEST_PATH_MINIMAL";

const WORKLOADS: [(&str, f64); 3] = [("point reads", 1.0), ("single-row inserts", 0.0), ("90% reads, 10% inserts", 0.9)];

/// One workload's figures from one round against one server.
#[derive(Clone, Copy, Default)]
struct Figures {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu_us: f64,
}

fn main() {
    if let Ok(role) = std::env::var(MINIMAL_ROLE) {
        let (addr, db) = role.split_once(',').expect("address,database");
        minimal_server::serve(addr.parse().unwrap(), db.into());
    }
    let env = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    let (rounds, seconds, connections) =
        (env("REQUEST_PATH_ROUNDS", 3) as usize, env("REQUEST_PATH_SECONDS", 8), env("REQUEST_PATH_CONNECTIONS", 32));
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // [server][workload][round]
    let mut figures = vec![vec![Vec::new(); WORKLOADS.len()]; 2];
    for round in 0..rounds {
        for turn in 0..2 {
            let side = (round + turn) % 2;
            let measured = runtime.block_on(measure(side, seconds, connections));
            for (w, f) in measured.into_iter().enumerate() {
                figures[side][w].push(f);
            }
        }
    }
    report(&figures, rounds, seconds, connections);
}

const SIDES: [&str; 2] = ["sqld", "minimal server"];

/// Starts side `side` on fresh data, loads the keys, runs every workload, stops it.
async fn measure(side: usize, seconds: u64, connections: u64) -> Vec<Figures> {
    let dir = tempfile::tempdir().unwrap();
    let addr: SocketAddr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let child = match side {
        0 => Command::new(std::env::var("REQUEST_PATH_SQLD").unwrap_or_else(|_| env!("CARGO_BIN_EXE_sqld").into()))
            .arg("--db-path")
            .arg(dir.path().join("data"))
            .args(["--http-listen-addr", &addr.to_string()])
            .env("RUST_LOG", "error")
            .stdout(Stdio::null())
            .spawn(),
        _ => Command::new(std::env::current_exe().unwrap())
            .env(MINIMAL_ROLE, format!("{addr},{}", dir.path().join("data.db").display()))
            .stdout(Stdio::null())
            .spawn(),
    };
    let server = Server(child.expect("starting a server"));
    let http = Http::new(format!("http://{addr}/v2/pipeline"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.try_pipeline(vec![stmt("SELECT 1", vec![]), close()]).await.is_none() {
        assert!(Instant::now() < deadline, "{} did not start", SIDES[side]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let load = format!(
        "INSERT INTO kv WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {KEYS}) SELECT i, randomblob(100) FROM s"
    );
    let loaded = http.pipeline(vec![stmt("CREATE TABLE kv (k INTEGER PRIMARY KEY, v BLOB)", vec![]), stmt(&load, vec![]), close()]).await;
    assert_eq!(loaded["results"][1]["type"], "ok", "{loaded}");

    let mut out = Vec::new();
    for (workload, read_share) in WORKLOADS {
        let rows_before = count(&http).await;
        let cpu_before = cpu_us(server.0.id());
        let run = wrk(addr, read_share, seconds, connections);
        let cpu = cpu_us(server.0.id()) - cpu_before;
        let requests = run["requests"].as_f64().unwrap();
        assert_eq!(run["errors"], 0, "{}: {workload}: wrk counted errors: {run}", SIDES[side]);
        assert_eq!(run["hrana_errors"], 0, "{}: {workload}: answers held Hrana errors: {run}", SIDES[side]);
        // Every insert answered was made (and a few more may have been in flight at the end).
        let inserted = (count(&http).await - rows_before) as f64;
        let expected = requests * (1.0 - read_share);
        assert!(inserted >= expected * 0.9 - 1.0, "{}: {workload}: {inserted} rows for about {expected} inserts", SIDES[side]);
        out.push(Figures {
            rps: requests / (run["duration_us"].as_f64().unwrap() / 1e6),
            p50_ms: run["p50_us"].as_f64().unwrap() / 1e3,
            p99_ms: run["p99_us"].as_f64().unwrap() / 1e3,
            cpu_us: cpu / requests,
        });
    }
    drop(server);
    out
}

async fn count(http: &Http) -> i64 {
    let answer = http.pipeline(vec![stmt("SELECT count(*) FROM kv", vec![]), close()]).await;
    answer["results"][0]["response"]["result"]["rows"][0][0]["value"].as_str().unwrap().parse().unwrap()
}

/// Runs wrk against `addr` (a share `read_share` of point reads, the rest inserts) and returns
/// what its `done` hook printed.
fn wrk(addr: SocketAddr, read_share: f64, seconds: u64, connections: u64) -> Value {
    let script = tempfile::Builder::new().suffix(".lua").tempfile().unwrap();
    std::fs::write(script.path(), lua(read_share)).unwrap();
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{connections}"), &format!("-d{seconds}s"), "--latency", "-s"])
        .arg(script.path())
        .arg(format!("http://{addr}"))
        .output()
        .expect("running wrk (apt-get install wrk)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().find_map(|l| l.strip_prefix("BENCH ")).unwrap_or_else(|| panic!("wrk printed no figures: {stdout}"));
    serde_json::from_str(line).unwrap()
}

/// wrk's script: each request a point read with chance `read_share`, else an insert; answers
/// holding a Hrana error are counted (they are HTTP 200s); at the end, one `BENCH {json}`
/// line.
fn lua(read_share: f64) -> String {
    let read = r#"{"requests":[{"type":"execute","stmt":{"sql":"SELECT v FROM kv WHERE k = ?","args":[{"type":"integer","value":"%d"}]}},{"type":"close"}]}"#;
    let insert = r#"{"requests":[{"type":"execute","stmt":{"sql":"INSERT INTO kv (v) VALUES (randomblob(100))"}},{"type":"close"}]}"#;
    format!(
        r#"
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local read = '{read}'
local insert = '{insert}'
local threads = {{}}
setup = function(thread)
  table.insert(threads, thread)
end
init = function(args)
  hrana_errors = 0
end
response = function(status, headers, body)
  if string.find(body, '"type":"error"', 1, true) then
    hrana_errors = hrana_errors + 1
  end
end
request = function()
  if math.random() < {read_share} then
    return wrk.format(nil, "/v2/pipeline", nil, string.format(read, math.random(1, {KEYS})))
  end
  return wrk.format(nil, "/v2/pipeline", nil, insert)
end
done = function(summary, latency, requests)
  local e = summary.errors
  local hrana = 0
  for _, thread in ipairs(threads) do
    hrana = hrana + thread:get("hrana_errors")
  end
  io.write(string.format('BENCH {{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"errors":%d,"hrana_errors":%d}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout, hrana))
end
"#
    )
}

fn report(figures: &[Vec<Vec<Figures>>], rounds: usize, seconds: u64, connections: u64) {
    let median = |runs: &[Figures], key: fn(&Figures) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(key).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!("\nwrk -t2 -c{connections} -d{seconds}s, median of {rounds} rounds (2 cores)");
    println!("{:<24} {:<15} {:>9} {:>9} {:>9} {:>11}", "workload", "server", "req/s", "p50 ms", "p99 ms", "CPU us/req");
    let mut json = Vec::new();
    for (w, (workload, _)) in WORKLOADS.iter().enumerate() {
        let mut sides = Vec::new();
        for (s, name) in SIDES.iter().enumerate() {
            let runs = &figures[s][w];
            let f = Figures {
                rps: median(runs, |f| f.rps),
                p50_ms: median(runs, |f| f.p50_ms),
                p99_ms: median(runs, |f| f.p99_ms),
                cpu_us: median(runs, |f| f.cpu_us),
            };
            println!("{workload:<24} {name:<15} {:>9.0} {:>9.2} {:>9.2} {:>11.0}", f.rps, f.p50_ms, f.p99_ms, f.cpu_us);
            sides.push(f);
        }
        let (this, minimal) = (sides[0], sides[1]);
        println!(
            "{:<24} {:<15} {:>8.0}% {:>8.1}x {:>8.1}x {:>10.1}x",
            "",
            "sqld / minimal",
            100.0 * this.rps / minimal.rps,
            this.p50_ms / minimal.p50_ms,
            this.p99_ms / minimal.p99_ms,
            this.cpu_us / minimal.cpu_us
        );
        let side = |f: Figures| json!({"rps": f.rps, "p50_ms": f.p50_ms, "p99_ms": f.p99_ms, "cpu_us_per_request": f.cpu_us});
        json.push(json!({"workload": workload, "sqld": side(this), "minimal": side(minimal), "rps_ratio": this.rps / minimal.rps}));
    }
    std::fs::create_dir_all("bench-results").unwrap();
    let path = Path::new("bench-results/request_path.json");
    let doc = json!({"rounds": rounds, "seconds": seconds, "connections": connections, "workloads": json});
    std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap()).unwrap();
    println!("\nwritten to {}", path.canonicalize().unwrap().display());
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
