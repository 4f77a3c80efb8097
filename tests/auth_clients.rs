//! Real libSQL clients pass their tokens unchanged to a server started with a key file: the
//! `libsql` crate (remote, and its sync-v2 embedded replica), `@libsql/client` over HTTP and
//! as an embedded replica, and the Python `libsql` embedded replica. Read-only tokens read and
//! pull but cannot write; clients without a token are refused.

use std::process::Command;

use libsql::Value;
use serde_json::json;

use crate::common::process::{rows, Sqld};
use crate::common::tokens::Signer;
use crate::foreign_clients::{clients_dir, run_sync, Client};

/// A server whose users need a token signed by the returned key.
fn sqld_with_auth() -> (Sqld, Signer, tempfile::TempDir) {
    let signer = Signer::generate();
    let keys = tempfile::tempdir().unwrap();
    let path = keys.path().join("jwt.pem");
    std::fs::write(&path, signer.pem()).unwrap();
    let sqld = Sqld::start(&["--auth-jwt-key-file", path.to_str().unwrap()]);
    (sqld, signer, keys)
}

async fn fill(sqld: &Sqld, token: &str) -> Vec<Vec<Value>> {
    let conn = sqld.connect_as(token.to_owned()).await;
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    conn.execute("INSERT INTO t SELECT value, randomblob(64) FROM generate_series(1, 500)", ()).await.unwrap();
    rows(&conn, "SELECT id, hex(v) FROM t ORDER BY id").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_remote_and_embedded_replica_pass_tokens() {
    let (sqld, signer, _keys) = sqld_with_auth();
    let (rw, ro) = (signer.token(json!({})), signer.token(json!({"a": "ro"})));
    let expected = fill(&sqld, &rw).await;

    let reader = sqld.connect_as(ro.clone()).await;
    assert_eq!(rows(&reader, "SELECT id, hex(v) FROM t ORDER BY id").await, expected);
    let refused = reader.execute("INSERT INTO t VALUES (9999, x'00')", ()).await.unwrap_err();
    assert!(refused.to_string().contains("AUTH_READ_ONLY"), "{refused}");
    let nobody = sqld.connect_as(String::new()).await;
    let refused = nobody.query("SELECT 1", ()).await.err().expect("no token is refused");
    assert!(refused.to_string().contains("401"), "{refused}");

    // An embedded replica (sync v2) pulls with a read-only token.
    let dir = tempfile::tempdir().unwrap();
    let replica = libsql::Builder::new_synced_database(dir.path().join("r.db"), sqld.url(), ro)
        .connector(hyper::client::HttpConnector::new())
        .build()
        .await
        .unwrap();
    replica.sync().await.unwrap();
    assert_eq!(rows(&replica.connect().unwrap(), "SELECT id, hex(v) FROM t ORDER BY id").await, expected);

    // With a token of another key its sync fails, without a crash, and its rows stay.
    let stranger = Signer::generate().token(json!({}));
    let other = libsql::Builder::new_synced_database(dir.path().join("r.db"), sqld.url(), stranger)
        .connector(hyper::client::HttpConnector::new())
        .build()
        .await;
    if let Ok(other) = other {
        assert!(other.sync().await.is_err(), "a sync with a foreign token succeeded");
    }
}

/// Syncs a foreign client's replica with `token`: its rows, or the process's error output.
fn foreign_sync(client: Client, sqld: &Sqld, token: Option<&str>) -> Result<Vec<Vec<Value>>, String> {
    let dir = tempfile::tempdir().unwrap();
    let output = run_sync(client, &dir.path().join("replica.db"), &sqld.url(), token);
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned());
    }
    let synced: Vec<(i64, String)> = serde_json::from_slice(&output.stdout).unwrap();
    Ok(synced.into_iter().map(|(id, hex)| vec![Value::Integer(id), Value::Text(hex)]).collect())
}

async fn foreign_embedded_replica(client: Client) {
    let (sqld, signer, _keys) = sqld_with_auth();
    let rw = signer.token(json!({}));
    let expected = fill(&sqld, &rw).await;
    let ro = signer.token(json!({"p": {"ro": {"ns": ["default"]}}}));
    let synced = tokio::task::block_in_place(|| foreign_sync(client, &sqld, Some(&ro)));
    assert_eq!(synced.unwrap_or_else(|e| panic!("{client:?} with a token: {e}")), expected);
    let refused = tokio::task::block_in_place(|| foreign_sync(client, &sqld, None));
    assert!(refused.is_err(), "{client:?} synced without a token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_embedded_replica_passes_its_auth_token() {
    foreign_embedded_replica(Client::Python).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_embedded_replica_passes_its_auth_token() {
    foreign_embedded_replica(Client::Node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_client_over_http_passes_its_auth_token() {
    let (sqld, signer, _keys) = sqld_with_auth();
    let remote = |token: &str| {
        let output = Command::new("node")
            .arg(clients_dir().join("node_remote.js"))
            .arg(sqld.url())
            .arg(token)
            .current_dir(clients_dir())
            .output()
            .expect("running node");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = tokio::task::block_in_place(|| remote(&signer.token(json!({"a": "rw"}))));
    assert!(ok, "{err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["count"], 2);
    let (ok, _, err) = tokio::task::block_in_place(|| remote(&signer.token(json!({"a": "ro"}))));
    assert!(!ok && err.contains("AUTH_READ_ONLY"), "a read-only token wrote: {err}");
    let (ok, _, err) = tokio::task::block_in_place(|| remote(&Signer::generate().token(json!({}))));
    assert!(!ok && err.contains("AUTH_BAD_SIGNATURE"), "a foreign token was accepted: {err}");
    // Nothing the refused clients sent was written.
    let conn = sqld.connect_as(signer.token(json!({}))).await;
    assert_eq!(rows(&conn, "SELECT count(*) FROM r").await, vec![vec![Value::Integer(2)]]);
}
