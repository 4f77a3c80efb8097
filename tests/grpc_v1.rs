//! Embedded replicas of the older protocol (the `libsql` crate with `SyncProtocol::V1`: gRPC-web
//! `wal_log.ReplicationLog` on the user port) against a real `sqld`: bootstrap, follow commits,
//! follow compactions, a reset-replication and a rebuild after `kill -9`, every row compared.

use std::path::Path;

use libsql::{Database, Value};

use crate::common::process::Sqld;
use crate::sync_v2::{assert_in_sync, remote_replica};

async fn replica_v1(sqld: &Sqld, path: &Path) -> Database {
    remote_replica(sqld, path, libsql::SyncProtocol::V1).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_replicas_bootstrap_follow_compactions_and_log_rebuilds() {
    // A small log: rewriting the table a few times retires it (compaction, snapshots).
    let mut sqld = Sqld::start(&["--max-log-size", "1"]);
    let primary = sqld.connect().await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    primary.execute("INSERT INTO t SELECT value, randomblob(100) FROM generate_series(1, 20000)", ()).await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let replica = replica_v1(&sqld, &dir.path().join("replica.db")).await;
    assert_in_sync(&primary, &replica).await;
    // A second replica that bootstraps later, and one that stays behind through compactions.
    let behind = replica_v1(&sqld, &dir.path().join("behind.db")).await;
    assert_in_sync(&primary, &behind).await;

    for i in 0..3 {
        primary.execute("INSERT INTO t VALUES (?1, randomblob(50))", [100_000 + i]).await.unwrap();
        assert_in_sync(&primary, &replica).await;
    }
    // A transaction larger than SQLite's page cache, pulled across several batches.
    let tx = primary.transaction().await.unwrap();
    tx.execute("UPDATE t SET v = randomblob(300) WHERE id % 2 = 0", ()).await.unwrap();
    tx.execute("INSERT INTO t SELECT 200000 + value, randomblob(1000) FROM generate_series(1, 6000)", ()).await.unwrap();
    tx.commit().await.unwrap();
    assert_in_sync(&primary, &replica).await;

    // Compactions: the log moves past where `behind` stands; it gets the snapshot (the new
    // log's image) and goes on from there.
    let compactions_before = sqld.admin_get("/v1/namespaces/default/stats").await["replication"]["compactions"].as_u64().unwrap_or(0);
    for round in 0..4 {
        primary.execute("UPDATE t SET v = randomblob(120) WHERE id % 4 = ?1", [round]).await.unwrap();
        assert_in_sync(&primary, &replica).await;
    }
    let stats = sqld.admin_get("/v1/namespaces/default/stats").await;
    assert!(stats["replication"]["compactions"].as_u64().unwrap() > compactions_before, "the log was compacted: {stats}");
    assert_in_sync(&primary, &behind).await;
    assert!(
        crate::common::process::metric(&sqld, "sqld_replication_snapshots_served_total{namespace=\"default\"}").await >= 1,
        "behind was sent a snapshot"
    );

    // reset-replication: a new log_id; replicas start over from its image.
    let (status, body) = sqld.admin_post("/v1/namespaces/default/reset-replication").await;
    assert_eq!(status, 200, "{body}");
    primary.execute("DELETE FROM t WHERE id % 5 = 0", ()).await.unwrap();
    assert_in_sync(&primary, &replica).await;

    // kill -9: the next open rebuilds the log (a new log_id again), and a new session.
    tokio::task::block_in_place(|| {
        sqld.signal("KILL");
        sqld.spawn(&["--max-log-size", "1"]);
    });
    let primary = sqld.connect().await;
    primary.execute("UPDATE t SET v = x'01' WHERE id % 7 = 0", ()).await.unwrap();
    assert_in_sync(&primary, &replica).await;
    assert_in_sync(&primary, &behind).await;

    // Reopened from its own files, a replica resumes.
    drop(replica);
    let reopened = replica_v1(&sqld, &dir.path().join("replica.db")).await;
    primary.execute("INSERT INTO t VALUES (999999, 'after reopening')", ()).await.unwrap();
    assert_in_sync(&primary, &reopened).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1_replica_writes_go_through_the_proxy_and_come_back() {
    let sqld = Sqld::start(&[]);
    let primary = sqld.connect().await;
    primary.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v)", ()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let replica = libsql::Builder::new_remote_replica(dir.path().join("r.db"), sqld.url(), String::new())
        .connector(hyper::client::HttpConnector::new())
        .sync_protocol(libsql::SyncProtocol::V1)
        .read_your_writes(true)
        .build()
        .await
        .unwrap();
    replica.sync().await.unwrap();
    let conn = replica.connect().unwrap();

    // Every value type, written through the replica: it reads its own write at once.
    let values = [Value::Null, Value::Integer(-7), Value::Real(2.5), Value::Text("héllo".into()), Value::Blob(vec![0, 1, 255])];
    for (i, v) in values.iter().enumerate() {
        conn.execute("INSERT INTO t VALUES (?1, ?2)", libsql::params![i as i64, v.clone()]).await.unwrap();
    }
    let mut got = conn.query("SELECT v FROM t ORDER BY id", ()).await.unwrap();
    for v in &values {
        assert_eq!(&got.next().await.unwrap().unwrap().get_value(0).unwrap(), v);
    }
    // Named parameters, and a statement with an error: the client sees SQLite's error.
    conn.execute("INSERT INTO t VALUES (:id, :v)", libsql::named_params! {":id": 10, ":v": "named"}).await.unwrap();
    let err = conn.execute("INSERT INTO t VALUES (10, 'again')", ()).await.unwrap_err();
    assert!(err.to_string().contains("UNIQUE"), "{err}");

    // A statement prepared on the replica for the primary is described there (`Describe`).
    let stmt = conn.prepare("INSERT INTO t VALUES (:id, :v) RETURNING id, v").await.unwrap();
    assert_eq!(stmt.parameter_count(), 2);
    // (The remote statement numbers its parameters from 0.)
    assert_eq!((stmt.parameter_name(0), stmt.parameter_name(1)), (Some(":id"), Some(":v")));
    assert_eq!(stmt.columns().iter().map(|c| c.name().to_owned()).collect::<Vec<_>>(), ["id", "v"]);
    stmt.execute(libsql::named_params! {":id": 11, ":v": "prepared"}).await.unwrap();
    assert!(conn.prepare("INSERT INTO missing VALUES (1)").await.is_err(), "a statement that does not describe");

    // Interactive transactions across calls: committed, then rolled back.
    let tx = conn.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (20, 'in a transaction')", ()).await.unwrap();
    tx.execute("UPDATE t SET v = 'updated' WHERE id = 20", ()).await.unwrap();
    tx.commit().await.unwrap();
    let tx = conn.transaction().await.unwrap();
    tx.execute("INSERT INTO t VALUES (21, 'rolled back')", ()).await.unwrap();
    tx.rollback().await.unwrap();
    let on_primary = crate::common::process::rows(&primary, "SELECT id, v FROM t WHERE id >= 20 ORDER BY id").await;
    assert_eq!(on_primary, vec![vec![Value::Integer(20), Value::Text("updated".into())]]);
    assert_in_sync(&primary, &replica).await;
}
