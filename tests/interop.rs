//! Interoperability with the libSQL server itself (opt-in: `SQLD_UPSTREAM_BIN` names its
//! binary, e.g. `../shared/bin/sqld-libsql-0.24.33`): that server as a replica of this one over
//! gRPC, through a 20k-row bootstrap, writes on both sides (the replica's forwarded over
//! `StreamExec`), and a log rebuild of the primary; and this server as a replica of that server
//! (`--primary-grpc-url`) through a 20k-row bootstrap, writes on both sides (the replica's
//! forwarded with `Execute`), and the log rebuild of a `kill -9`. Exactly the primary's rows
//! each time.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::process::{remote, rows, Sqld};

/// A libSQL server process, killed when dropped.
struct Upstream {
    child: Child,
    url: String,
    grpc: String,
    args: Vec<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn upstream_bin() -> Option<String> {
    let bin = std::env::var("SQLD_UPSTREAM_BIN").ok();
    if bin.is_none() {
        eprintln!("skipped: set SQLD_UPSTREAM_BIN to the libSQL server's binary to run the interoperability tests");
    }
    bin
}

/// Starts the libSQL server as a replica of `primary_grpc` and waits until it answers.
fn upstream_replica(bin: &str, primary_grpc: &str) -> Upstream {
    upstream(bin, &["--primary-grpc-url", primary_grpc])
}

/// Starts the libSQL server as a primary with a gRPC port.
fn upstream_primary(bin: &str) -> Upstream {
    let grpc = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let mut upstream = upstream(bin, &["--grpc-listen-addr", &grpc]);
    upstream.grpc = format!("http://{grpc}");
    upstream
}

fn upstream(bin: &str, args: &[&str]) -> Upstream {
    let dir = tempfile::tempdir().unwrap();
    let addr = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let mut all = vec![bin.to_owned(), "--db-path".into(), dir.path().join("up.sqld").to_str().unwrap().into()];
    all.extend(["--http-listen-addr".into(), addr.to_string()]);
    all.extend(args.iter().map(|a| a.to_string()));
    let child = spawn(&all, addr);
    Upstream { child, url: format!("http://{addr}"), grpc: String::new(), args: all, _dir: dir }
}

/// Runs `args` (binary first) and waits until it listens on `addr`.
fn spawn(args: &[String], addr: std::net::SocketAddr) -> Child {
    let child =
        Command::new(&args[0]).args(&args[1..]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawning the libSQL server");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the libSQL server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

impl Upstream {
    /// `kill -9`, then the same command again.
    fn kill_and_restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let addr = self.url.trim_start_matches("http://").parse().unwrap();
        self.child = spawn(&self.args, addr);
    }
}

const ALL: &str = "SELECT id, hex(v) FROM t ORDER BY id";

/// Every row of `t`, or the error (the replica may not have the table yet).
async fn try_rows(conn: &libsql::Connection) -> Result<Vec<Vec<libsql::Value>>, libsql::Error> {
    let mut rows = conn.query(ALL, ()).await?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().await? {
        out.push((0..row.column_count()).map(|i| row.get_value(i).unwrap()).collect());
    }
    Ok(out)
}

/// Waits (bounded) until `replica` answers exactly `primary`'s rows.
async fn assert_same_rows(primary: &libsql::Connection, replica: &libsql::Connection) {
    let expected = rows(primary, ALL).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = try_rows(replica).await.unwrap_or_default();
        if got == expected {
            return;
        }
        assert!(Instant::now() < deadline, "the replica holds {} rows, not the primary's {}", got.len(), expected.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_libsql_server_replicates_this_one() {
    let Some(bin) = upstream_bin() else { return };
    let sqld = Sqld::start(&[]);
    let primary = sqld.connect().await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t SELECT value, randomblob(100) FROM generate_series(1, 20000)", ()).await.unwrap();
    let upstream = tokio::task::block_in_place(|| upstream_replica(&bin, &format!("http://{}", sqld.grpc)));
    let replica = remote(upstream.url.clone(), String::new()).await;
    assert_same_rows(&primary, &replica).await;

    // Writes on the primary, and through the replica (forwarded over StreamExec).
    primary.execute("UPDATE t SET v = x'00' WHERE id % 3 = 0", ()).await.unwrap();
    // (The libSQL server's replica does not wait for its own forwarded write before a read on
    // the same stream, with its own primary either: only convergence is checked.)
    replica.execute("INSERT INTO t VALUES (30001, x'abcd')", ()).await.unwrap();
    let tx = replica.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (30002, x'01')", ()).await.unwrap();
    tx.execute("DELETE FROM t WHERE id < 100", ()).await.unwrap();
    tx.commit().await.unwrap();
    assert_same_rows(&primary, &replica).await;

    // A log rebuild of the primary: the replica starts over from the new log and converges.
    // (The libSQL server's replica resets its copy only once no client holds a connection on
    // it: this client lets go of its own first.)
    drop(replica);
    let (status, body) = sqld.admin_post("/v1/namespaces/default/reset-replication").await;
    assert_eq!(status, 200, "{body}");
    primary.execute("DELETE FROM t WHERE id % 5 = 0", ()).await.unwrap();
    assert_same_rows(&primary, &remote(upstream.url.clone(), String::new()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_server_as_a_replica_of_the_libsql_server() {
    let Some(bin) = upstream_bin() else { return };
    let mut upstream = tokio::task::block_in_place(|| upstream_primary(&bin));
    let primary = remote(upstream.url.clone(), String::new()).await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t SELECT value, randomblob(100) FROM generate_series(1, 20000)", ()).await.unwrap();
    let replica = tokio::task::block_in_place(|| Sqld::start(&["--primary-grpc-url", &upstream.grpc]));
    let conn = replica.connect().await;
    assert_same_rows(&primary, &conn).await;

    // Writes on the primary, and through the replica (forwarded with `Execute`), read back
    // on the replica at once by the stream that wrote.
    primary.execute("UPDATE t SET v = x'00' WHERE id % 3 = 0", ()).await.unwrap();
    primary.execute("DELETE FROM t WHERE id < 100", ()).await.unwrap();
    let insert = serde_json::json!({"type": "execute", "stmt": {"sql": "INSERT INTO t VALUES (30001, x'01')"}});
    let select = serde_json::json!({"type": "execute", "stmt": {"sql": "SELECT hex(v) FROM t WHERE id = 30001"}});
    let (status, answer) = replica.pipeline(serde_json::json!({"requests": [insert, select]})).await;
    assert_eq!(status, hyper::StatusCode::OK, "{answer}");
    assert_eq!(answer["results"][1]["response"]["result"]["rows"][0][0]["value"], "01", "{answer}");
    assert_same_rows(&primary, &conn).await;

    // kill -9: the libSQL server rebuilds its log at the next start (a new log_id); the
    // replica starts over from the new log by itself.
    tokio::task::block_in_place(|| upstream.kill_and_restart());
    let primary = remote(upstream.url.clone(), String::new()).await;
    primary.execute("DELETE FROM t WHERE id % 5 = 0", ()).await.unwrap();
    assert_same_rows(&primary, &conn).await;
}
