//! Embedded replicas of the Python `libsql` package (0.1.11, which speaks sync v2 only) and of
//! `@libsql/client` (a `file:` URL with `syncUrl`), each run as its own process by a small
//! script in `tests/clients/`: bootstrap, follow a write, follow a log rebuild.
//! `scripts/test.sh` installs both clients and tells the tests where they are.

use std::path::{Path, PathBuf};
use std::process::Command;

use libsql::Value;

use crate::common::process::Sqld;

#[derive(Clone, Copy, Debug)]
pub enum Client {
    Python,
    Node,
}

pub fn clients_dir() -> PathBuf {
    PathBuf::from(std::env::var("SQLD_TEST_CLIENTS_DIR").expect(
        "SQLD_TEST_CLIENTS_DIR is not set: run the suite with ./scripts/test.sh, which installs the Python and npm clients",
    ))
}

/// Runs one sync of `client` on the local database `path`; the replica's rows.
fn sync_with(client: Client, path: &Path, url: &str) -> Vec<(i64, String)> {
    let output = run_sync(client, path, url, None);
    assert!(
        output.status.success(),
        "{client:?} client failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{client:?} printed no rows ({e}): {}", String::from_utf8_lossy(&output.stdout)))
}

/// Runs one sync of `client` on `path` from `url`, with `token` if given; the process's output.
pub fn run_sync(client: Client, path: &Path, url: &str, token: Option<&str>) -> std::process::Output {
    let dir = clients_dir();
    let mut command = match client {
        Client::Python => {
            let python = std::env::var("SQLD_TEST_PYTHON").expect("SQLD_TEST_PYTHON is not set: run ./scripts/test.sh");
            let mut c = Command::new(python);
            c.arg(dir.join("python_sync.py"));
            c
        }
        Client::Node => {
            let mut c = Command::new("node");
            c.arg(dir.join("node_sync.js"));
            c
        }
    };
    command.arg(path).arg(url).args(token).current_dir(&dir).output().expect("running the client")
}

pub async fn primary_rows(sqld: &Sqld) -> Vec<(i64, String)> {
    let conn = sqld.connect().await;
    let mut rows = conn.query("SELECT id, hex(v) FROM t ORDER BY id", ()).await.unwrap();
    let mut out = Vec::new();
    while let Some(row) = rows.next().await.unwrap() {
        let Value::Text(hex) = row.get_value(1).unwrap() else { panic!("hex() gives text") };
        out.push((row.get::<i64>(0).unwrap(), hex));
    }
    out
}

/// Syncs `client`'s replica at `path` from `url` and checks it holds exactly the primary's rows.
async fn assert_synced(client: Client, sqld: &Sqld, path: &Path, url: &str, what: &str) {
    let synced = tokio::task::block_in_place(|| sync_with(client, path, url));
    assert_eq!(synced, primary_rows(sqld).await, "{client:?}: {what}");
}

async fn bootstrap_follow_and_rebuild(client: Client) {
    let mut sqld = Sqld::start(&[]);
    let conn = sqld.connect().await;
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    conn.execute("INSERT INTO t SELECT value, randomblob(64) FROM generate_series(1, 2000)", ()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.db");
    let url = sqld.url();

    assert_synced(client, &sqld, &path, &url, "bootstrap").await;

    conn.execute("INSERT INTO t VALUES (5000, randomblob(10))", ()).await.unwrap();
    assert_synced(client, &sqld, &path, &url, "follow a write").await;

    // kill -9: the log is rebuilt (a new generation); the replica follows from its files.
    tokio::task::block_in_place(|| {
        sqld.signal("KILL");
        sqld.spawn(&[]);
    });
    let conn = sqld.connect().await;
    conn.execute("DELETE FROM t WHERE id % 2 = 0", ()).await.unwrap();
    conn.execute("INSERT INTO t VALUES (6000, randomblob(10))", ()).await.unwrap();
    assert_synced(client, &sqld, &path, &url, "follow a log rebuild").await;
}

/// A client follows `reset-replication` (a new log and generation) from its local files.
async fn follow_a_reset(client: Client) {
    let sqld = Sqld::start(&[]);
    let conn = sqld.connect().await;
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    conn.execute("INSERT INTO t SELECT value, randomblob(64) FROM generate_series(1, 2000)", ()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.db");
    let url = sqld.url();
    assert_synced(client, &sqld, &path, &url, "bootstrap").await;

    crate::reset_replicas::reset(&sqld).await;
    conn.execute("DELETE FROM t WHERE id % 3 = 0", ()).await.unwrap();
    assert_synced(client, &sqld, &path, &url, "after a reset").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_embedded_replica_follows_a_reset() {
    follow_a_reset(Client::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_embedded_replica_follows_a_reset() {
    follow_a_reset(Client::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_embedded_replica_bootstraps_follows_and_survives_a_rebuild() {
    bootstrap_follow_and_rebuild(Client::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_embedded_replica_bootstraps_follows_and_survives_a_rebuild() {
    bootstrap_follow_and_rebuild(Client::Node).await;
}

/// A client stopped part-way through pulling a transaction while compactions supersede its
/// generation finishes its sync without an error and holds exactly the primary's rows.
async fn compactions_mid_transaction(client: Client) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use crate::generation_switch::{compactions, start_proxy};

    let sqld = Sqld::start(&["--max-log-size", "1"]);
    let conn = sqld.connect().await;
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    conn.execute("INSERT INTO t VALUES (1, x'01')", ()).await.unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let proxy = start_proxy(sqld.user, armed.clone(), compactions(sqld.user, 2)).await;
    let url = format!("http://{proxy}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.db");
    assert_synced(client, &sqld, &path, &url, "bootstrap").await;

    conn.execute("INSERT INTO t SELECT 1 + value, randomblob(3000) FROM generate_series(1, 1000)", ()).await.unwrap();
    armed.store(true, Ordering::SeqCst);
    assert_synced(client, &sqld, &path, &url, "after compactions mid-transaction").await;
    assert!(!armed.load(Ordering::SeqCst), "{client:?}: the proxy made compactions mid-transaction");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_embedded_replica_finishes_a_transaction_across_compactions() {
    compactions_mid_transaction(Client::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_embedded_replica_finishes_a_transaction_across_compactions() {
    compactions_mid_transaction(Client::Node).await;
}
