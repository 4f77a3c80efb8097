//! `reset-replication` against a real `sqld` with real replicas: a Hrana stream opened before
//! a reset writes after it into the new log, and embedded replicas (the `libsql` crate,
//! Python, Node) follow the reset to exactly the primary's rows.

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::common::process::{rows, Sqld};
use crate::common::{close, execute};

pub async fn reset(sqld: &Sqld) -> Value {
    let (status, body) = sqld.admin_post("/v1/namespaces/default/reset-replication").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

async fn replica(sqld: &Sqld, path: &std::path::Path) -> libsql::Database {
    libsql::Builder::new_synced_database(path, sqld.url(), String::new())
        .connector(hyper::client::HttpConnector::new())
        .build()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_opened_before_a_reset_writes_into_the_new_log_and_replicas_follow() {
    let sqld = Sqld::start(&[]);
    let primary = sqld.connect().await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t SELECT value, randomblob(500) FROM generate_series(1, 2000)", ()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replica.db");
    replica(&sqld, &path).await.sync().await.unwrap();

    // A stream (baton) opened before the reset, and still open after it.
    let (status, opened) = sqld.pipeline(json!({"requests": [execute("SELECT count(*) FROM t")]})).await;
    assert_eq!(status, StatusCode::OK, "{opened}");
    let baton = opened["baton"].as_str().expect("an open stream has a baton").to_owned();
    reset(&sqld).await;
    let (status, answer) = sqld
        .pipeline(json!({"baton": baton, "requests": [execute("INSERT INTO t VALUES (5000, 'written on an old stream')"), close()]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
    primary.execute("UPDATE t SET v = x'00' WHERE id % 10 = 0", ()).await.unwrap();

    // The replica follows into the new generation and holds exactly the primary's rows.
    let synced = replica(&sqld, &path).await;
    synced.sync().await.unwrap();
    let expected = rows(&primary, "SELECT id, hex(v) FROM t ORDER BY id").await;
    let got = rows(&synced.connect().unwrap(), "SELECT id, hex(v) FROM t ORDER BY id").await;
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "the replica holds exactly the primary's rows");
}
