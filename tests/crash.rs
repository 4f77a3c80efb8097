//! `kill -9` of a real `sqld` under a write load, every other time with SQLite's WAL lost as
//! well (a power cut): after every restart each acknowledged write is there and the rebuilt
//! replication log replays to exactly the data file.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use libsql_server::replication::verify::{compare_with_data, Comparison};

use crate::common::process::Sqld;

/// Inserts rows with increasing ids until the server goes away; the ids it acknowledged.
async fn write_until_killed(conn: libsql::Connection, first_id: i64) -> Vec<i64> {
    let mut acknowledged = Vec::new();
    for id in first_id.. {
        match conn.execute("INSERT INTO t (id, v) VALUES (?1, randomblob(2000))", [id]).await {
            Ok(_) => acknowledged.push(id),
            Err(_) => break,
        }
    }
    acknowledged
}

/// After a kill: restarts, checks every acknowledged id is there, stops cleanly and checks the
/// log offline (it replays to exactly the data file), then starts again.
async fn restart_and_check(sqld: &mut Sqld, args: &[&str], acknowledged: &[i64], data_dir: &Path, round: usize) {
    tokio::task::block_in_place(|| sqld.spawn(args));
    let conn = sqld.connect().await;
    let mut rows = conn.query("SELECT id FROM t", ()).await.unwrap();
    let mut present = HashSet::new();
    while let Some(row) = rows.next().await.unwrap() {
        present.insert(row.get::<i64>(0).unwrap());
    }
    let lost: Vec<_> = acknowledged.iter().filter(|id| !present.contains(id)).collect();
    assert!(lost.is_empty(), "round {round}: acknowledged writes lost: {lost:?}");

    let status = tokio::task::block_in_place(|| sqld.signal("TERM"));
    assert!(status.success(), "round {round}: clean stop failed: {status}");
    assert!(!data_dir.join(".sentinel").exists(), "a clean stop removes the sentinel");
    match compare_with_data(data_dir, &data_dir.join("data")).unwrap() {
        Comparison::Equal { .. } => {}
        other => panic!("round {round}: replay differs from data: {other:?}"),
    }
    tokio::task::block_in_place(|| sqld.spawn(args));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_write_load_keeps_every_acknowledged_write() {
    // A 1 MB log is retired every few hundred inserts, so kills also land inside compaction.
    let args = ["--max-log-size", "1"];
    let mut sqld = Sqld::start(&args);
    sqld.connect().await.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    let data_dir = sqld.db_path().join("dbs/default");

    let mut acknowledged: Vec<i64> = Vec::new();
    let mut next_id = 0;
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    for round in 0..20 {
        let writer = tokio::spawn(write_until_killed(sqld.connect().await, next_id));
        // The kill lands at a pseudo-random moment of the load: that moment is what is tested,
        // not something waited for.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(30 + seed % 250)).await;
        let status = tokio::task::block_in_place(|| sqld.signal("KILL"));
        assert!(!status.success());
        assert!(data_dir.join(".sentinel").exists(), "kill -9 leaves the sentinel");
        let acked = writer.await.unwrap();
        if round % 2 == 1 {
            // A power cut on top: SQLite does not sync (synchronous=OFF), so it may lose all
            // it had not written back, here its whole WAL. The log holds every acknowledged
            // commit durably and the next open rewrites the data file from it.
            for file in ["data-wal", "data-shm"] {
                let _ = std::fs::remove_file(data_dir.join(file));
            }
        }
        assert!(!acked.is_empty() || round > 0, "the load made progress");
        next_id = acked.last().map_or(next_id, |id| id + 1) + 1;
        acknowledged.extend(acked);

        restart_and_check(&mut sqld, &args, &acknowledged, &data_dir, round).await;
    }
    assert!(acknowledged.len() > 100, "the load wrote {} rows", acknowledged.len());
}

/// `reset-replication` called over and over under a write load, and `kill -9` at a
/// pseudo-random moment: every acknowledged write survives and the log replays to the data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_resets_under_write_load_keeps_every_acknowledged_write() {
    stop_during_resets_under_write_load("KILL").await;
}

/// The same with a graceful stop (SIGTERM) racing the resets: the process exits 0, leaves no
/// half-built log, and every acknowledged write is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_during_resets_under_write_load_is_clean_and_keeps_every_write() {
    stop_during_resets_under_write_load("TERM").await;
}

async fn stop_during_resets_under_write_load(signal: &str) {
    let mut sqld = Sqld::start(&[]);
    sqld.connect().await.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    let data_dir = sqld.db_path().join("dbs/default");
    let mut acknowledged: Vec<i64> = Vec::new();
    let mut next_id = 0;
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut resets_done = 0;
    for round in 0..10 {
        let writer = tokio::spawn(write_until_killed(sqld.connect().await, next_id));
        let admin = sqld.admin;
        let (first_done, first) = tokio::sync::oneshot::channel();
        let resetter = tokio::spawn(async move {
            let mut done = 0;
            let mut first_done = Some(first_done);
            loop {
                let request = hyper::Request::post(format!("http://{admin}/v1/namespaces/default/reset-replication"))
                    .body(hyper::Body::empty())
                    .unwrap();
                match hyper::Client::new().request(request).await {
                    Ok(response) if response.status() == 200 => {
                        done += 1;
                        if let Some(tx) = first_done.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(response) => assert_eq!(response.status(), 503, "a reset either works or finds the namespace busy"),
                    Err(_) => return done,
                }
            }
        });
        // One reset is done under the load; the kill then lands at a pseudo-random moment of
        // the ones that follow.
        first.await.expect("a reset completes under the write load");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(seed % 300)).await;
        let status = tokio::task::block_in_place(|| sqld.signal(signal));
        if signal == "KILL" {
            assert!(!status.success());
        } else {
            assert!(status.success(), "round {round}: a graceful stop during resets failed: {status}");
            assert!(!data_dir.join(".sentinel").exists(), "round {round}: a clean stop removes the sentinel");
            assert!(!data_dir.join("wallog.rebuild").exists(), "round {round}: a half-built log was left behind");
        }
        let acked = writer.await.unwrap();
        resets_done += resetter.await.unwrap();
        next_id = acked.last().map_or(next_id, |id| id + 1) + 1;
        acknowledged.extend(acked);

        restart_and_check(&mut sqld, &[], &acknowledged, &data_dir, round).await;
    }
    assert!(resets_done >= 10, "resets ran under the load: {resets_done}");
    // Writers queue behind each reset, so the load is slower than without them.
    assert!(acknowledged.len() >= 10, "the load wrote {} rows", acknowledged.len());
}
