//! Online per-namespace repair under turmoil: `integrity-check` classifies, and
//! `reset-replication` rebuilds a broken log from live data, never from corrupt data.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use hyper::{Method, StatusCode};
use libsql_server::replication::verify::{compare_with_data, Comparison};
use serde_json::{json, Value};

use crate::common::*;

/// Runs `client` against a server, with the path of its data directory.
fn with_server<F, Fut>(client: F)
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<(), Box<dyn std::error::Error>>> + 'static,
{
    let mut sim = sim();
    let dir = start_server(&mut sim, "primary", |_| {});
    sim.client("client", client(dir.path().join("dbs")));
    sim.run().unwrap();
}

async fn exec(ns: &str, sql: &str) -> Value {
    let (status, answer) = pipeline(ns, json!({"requests": [execute(sql), close()]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

/// A namespace `ns` holding a table of 200 rows (some 60 pages).
async fn namespace_with_rows(ns: &str) {
    assert_eq!(admin(Method::POST, &format!("/v1/namespaces/{ns}/create"), "").await.0, StatusCode::OK);
    exec(ns, "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)").await;
    exec(ns, "INSERT INTO t SELECT value, randomblob(1000) FROM generate_series(1, 200)").await;
}

async fn all_rows(ns: &str) -> Vec<Value> {
    rows(&exec(ns, "SELECT id, hex(v) FROM t ORDER BY id").await, 0)
}

async fn check(ns: &str, body: &str) -> Value {
    let (status, verdict) = admin(Method::POST, &format!("/v1/namespaces/{ns}/integrity-check"), body).await;
    assert_eq!(status, StatusCode::OK, "{verdict}");
    verdict
}

async fn reset(ns: &str) -> (StatusCode, Value) {
    admin(Method::POST, &format!("/v1/namespaces/{ns}/reset-replication"), "").await
}

async fn stats(ns: &str) -> Value {
    admin(Method::GET, &format!("/v1/namespaces/{ns}/stats"), "").await.1
}

/// Flips a byte of `file` at `at` (the namespace's own code never sees it coming).
fn corrupt(file: &Path, at: u64) {
    let f = std::fs::OpenOptions::new().read(true).write(true).open(file).unwrap();
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, at).unwrap();
    f.write_all_at(&[byte[0] ^ 0xff], at).unwrap();
    f.sync_all().unwrap();
}

/// The log replays to exactly the live data.
fn assert_replays_to_data(dir: &Path) {
    match compare_with_data(dir, &dir.join("data")).unwrap() {
        Comparison::Equal { .. } => {}
        other => panic!("the log does not replay to the data: {other:?}"),
    }
}

#[test]
fn integrity_check_on_healthy_namespace() {
    with_server(|_| async {
        namespace_with_rows("a").await;
        let verdict = check("a", r#"{"full": true}"#).await;
        assert_eq!(verdict["ok"], true, "{verdict}");
        assert_eq!(verdict["check"], "full");
        assert_eq!(verdict["message"], "ok");
        assert_eq!(verdict["replication_log"], json!({"ok": true, "message": "ok", "file": null, "frame_no": null}));
        assert_eq!(verdict["repair"], "none");
        assert!(verdict["elapsed_ms"].is_u64(), "{verdict}");
        Ok(())
    });
}

#[test]
fn integrity_check_defaults_to_quick_when_full_omitted() {
    with_server(|_| async {
        namespace_with_rows("a").await;
        for body in ["", "{}", "  ", r#"{"full": false}"#] {
            let verdict = check("a", body).await;
            assert_eq!(verdict["check"], "quick", "{body:?}: {verdict}");
            assert_eq!(verdict["repair"], "none");
        }
        Ok(())
    });
}

#[test]
fn integrity_check_on_nonexistent_namespace_returns_404() {
    with_server(|_| async {
        let (status, body) = admin(Method::POST, "/v1/namespaces/missing/integrity-check", "{}").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        assert!(body["error"].is_string());
        Ok(())
    });
}

#[test]
fn malformed_repair_bodies_are_400_and_change_nothing() {
    with_server(|_| async {
        namespace_with_rows("a").await;
        let log_id = stats("a").await["replication"]["log_id"].clone();
        for (route, body) in [
            ("integrity-check", "{not json"),
            ("integrity-check", r#"{"full": "yes"}"#),
            ("integrity-check", "[]"),
            ("reset-replication", "{not json"),
            ("reset-replication", "42"),
        ] {
            let (status, answer) = admin(Method::POST, &format!("/v1/namespaces/a/{route}"), body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{route} {body}: {answer}");
            assert!(answer["error"].is_string());
        }
        assert_eq!(stats("a").await["replication"]["log_id"], log_id, "no reset happened");
        Ok(())
    });
}

#[test]
fn reset_replication_preserves_data_on_healthy_namespace() {
    with_server(|dbs| async move {
        namespace_with_rows("a").await;
        let before = all_rows("a").await;
        let old = stats("a").await["replication"].clone();
        let (status, answer) = reset("a").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_ne!(answer["log_id"], old["log_id"], "a new log");
        assert!(answer["generation"].as_u64().unwrap() > old["generation"].as_u64().unwrap(), "a new generation: {answer}");
        assert_eq!(all_rows("a").await, before);
        let now = stats("a").await["replication"].clone();
        assert_eq!(now["log_id"], answer["log_id"]);
        assert_eq!(now["start_frame_no"], 0);
        assert_eq!(now["snapshot_count"], 0);
        // Writes after the reset land in the new log.
        exec("a", "INSERT INTO t VALUES (1000, x'00')").await;
        assert_eq!(check("a", "").await["repair"], "none");
        assert_replays_to_data(&dbs.join("a"));
        Ok(())
    });
}

#[test]
fn reset_replication_on_nonexistent_namespace_returns_404() {
    with_server(|_| async {
        let (status, body) = reset("missing").await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
        Ok(())
    });
}

/// A reset with nothing in SQLite's WAL leaves that WAL alone: a stream's connection keeps its
/// page cache (its `data_version` stays), while a write on another stream still moves it. A
/// checkpoint of the empty WAL restarted it, which made every pooled connection drop its cache.
#[test]
fn a_reset_with_an_empty_wal_leaves_the_readers_page_caches_alone() {
    with_server(|_| async {
        namespace_with_rows("a").await;
        // The first reset moves the rows' WAL frames into the data file.
        assert_eq!(reset("a").await.0, StatusCode::OK);
        let read_version = |baton: Value| async move {
            let (status, answer) = pipeline("a", json!({"baton": baton, "requests": [execute("PRAGMA data_version")]})).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            (rows(&answer, 0)[0][0].clone(), answer["baton"].clone())
        };
        let (before, baton) = read_version(Value::Null).await;
        assert_eq!(reset("a").await.0, StatusCode::OK);
        let (after, baton) = read_version(baton).await;
        assert_eq!(before, after, "the stream's connection dropped its page cache in a reset that had nothing to checkpoint");
        exec("a", "INSERT INTO t (v) VALUES (x'00')").await;
        let (written, _) = read_version(baton).await;
        assert_ne!(after, written, "data_version did not see another connection's write");
        Ok(())
    });
}

#[test]
fn reset_replication_is_idempotent() {
    with_server(|dbs| async move {
        namespace_with_rows("a").await;
        let before = all_rows("a").await;
        let (first, second) = (reset("a").await, reset("a").await);
        assert_eq!((first.0, second.0), (StatusCode::OK, StatusCode::OK), "{first:?} {second:?}");
        assert_ne!(first.1["log_id"], second.1["log_id"]);
        assert!(second.1["generation"].as_u64() > first.1["generation"].as_u64());
        assert_eq!(all_rows("a").await, before);
        assert_replays_to_data(&dbs.join("a"));
        Ok(())
    });
}

#[test]
fn reset_replication_response_includes_elapsed_ms() {
    with_server(|_| async {
        namespace_with_rows("a").await;
        let (status, answer) = reset("a").await;
        assert_eq!(status, StatusCode::OK);
        assert!(answer["elapsed_ms"].is_u64(), "{answer}");
        assert!(answer["pages"].as_u64().unwrap() > 50, "{answer}");
        Ok(())
    });
}

/// Mode A: the data is fine, a byte of the log is not. The verdict names the file and frame
/// and asks for `reset-replication`, which makes a log that verifies and replays to the data.
#[test]
fn a_corrupt_log_is_classified_and_reset_from_the_live_data() {
    with_server(|dbs| async move {
        namespace_with_rows("a").await;
        namespace_with_rows("b").await;
        let (before, bystander) = (all_rows("a").await, all_rows("b").await);
        // Frame 3's page (frames start after the 64-byte header, 4120 bytes each).
        corrupt(&dbs.join("a/wallog"), 64 + 3 * 4120 + 24 + 100);
        let verdict = check("a", "").await;
        assert_eq!(verdict["ok"], true, "{verdict}");
        assert_eq!(verdict["replication_log"]["ok"], false, "{verdict}");
        assert_eq!(verdict["replication_log"]["file"], "wallog");
        assert_eq!(verdict["replication_log"]["frame_no"], 3);
        assert_eq!(verdict["repair"], "reset-replication");

        let (status, answer) = reset("a").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(check("a", r#"{"full": true}"#).await["repair"], "none");
        assert_eq!(all_rows("a").await, before);
        assert_replays_to_data(&dbs.join("a"));
        assert_eq!(all_rows("b").await, bystander, "the other namespace is untouched");
        assert_eq!(check("b", "").await["repair"], "none");
        Ok(())
    });
}

/// Mode A in a snapshot: a compaction left one; a byte of it is corrupt.
#[test]
fn a_corrupt_snapshot_is_classified_and_reset_from_the_live_data() {
    let mut sim = sim();
    let dir = start_server(&mut sim, "primary", |config| config.max_log_size = 1);
    let dbs = dir.path().join("dbs");
    sim.client("client", async move {
        namespace_with_rows("a").await;
        // More than a database's worth and more than 1 MB of changes: a compaction.
        for _ in 0..3 {
            exec("a", "UPDATE t SET v = randomblob(1000)").await;
            exec("a", "INSERT INTO t SELECT 1000 + value + (SELECT max(id) FROM t), randomblob(3000) FROM generate_series(1, 100)").await;
        }
        // Settled: no compaction wanted or pending (they run on threads of their own, in real
        // time), and a snapshot there.
        let mut snapshots = Vec::new();
        for _ in 0..1000 {
            let log = stats("a").await["replication"].clone();
            snapshots = std::fs::read_dir(dbs.join("a/snapshots")).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
            if log["compaction_wanted"] == false && log["pending_compactions"] == 0 && !snapshots.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(!snapshots.is_empty(), "compactions settle");
        let before = all_rows("a").await;
        // The first frame's frame_no, past the snapshot's 48-byte header. (A snapshot's page
        // bytes carry no checksum of their own: every wallog opening with a full image, such
        // damage never reaches a replica's final state.)
        corrupt(&snapshots[0], 48 + 7);
        let verdict = check("a", "").await;
        assert_eq!(verdict["repair"], "reset-replication", "{verdict}");
        let file = verdict["replication_log"]["file"].as_str().unwrap().to_owned();
        assert!(file.starts_with("snapshots/"), "{verdict}");
        assert_eq!(reset("a").await.0, StatusCode::OK);
        assert_eq!(check("a", "").await["repair"], "none");
        assert_eq!(all_rows("a").await, before);
        assert_replays_to_data(&dbs.join("a"));
        Ok(())
    });
    sim.run().unwrap();
}

/// The root page of table `t` of namespace `ns`, after moving everything into the data file.
async fn table_root_page(ns: &str) -> u64 {
    assert_eq!(admin(Method::POST, &format!("/v1/namespaces/{ns}/checkpoint"), "").await.0, StatusCode::OK);
    let root = rows(&exec(ns, "SELECT rootpage FROM sqlite_schema WHERE name = 't'").await, 0);
    root[0][0]["value"].as_str().unwrap().parse().unwrap()
}

/// Mode B: a b-tree page of the data file is corrupt, the log is fine. The verdict asks for
/// `rebuild-data`; `reset-replication` refuses and changes nothing (a corrupt page never
/// reaches a new log).
#[test]
fn corrupt_data_is_classified_and_reset_refuses_it() {
    with_server(|dbs| async move {
        namespace_with_rows("a").await;
        let root = table_root_page("a").await;
        let log_id = stats("a").await["replication"]["log_id"].clone();
        // The page type byte of the table's root page.
        corrupt(&dbs.join("a/data"), (root - 1) * 4096);
        let verdict = check("a", "").await;
        assert_eq!(verdict["ok"], false, "{verdict}");
        assert_ne!(verdict["message"], "ok");
        assert_eq!(verdict["replication_log"]["ok"], true, "{verdict}");
        assert_eq!(verdict["repair"], "rebuild-data");

        let (status, answer) = reset("a").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
        assert_eq!(answer["code"], "DATA_CORRUPT");
        assert_eq!(stats("a").await["replication"]["log_id"], log_id, "the log was left as it was");

        // Both broken: only a backup helps.
        corrupt(&dbs.join("a/wallog"), 64 + 24 + 10);
        assert_eq!(check("a", "").await["repair"], "restore-from-backup");
        Ok(())
    });
}

/// A namespace whose page 1 is corrupt still gets a verdict (not a 500), and a reset of it is
/// refused clearly.
#[test]
fn a_namespace_with_a_corrupt_header_gets_a_verdict_and_a_clear_refusal() {
    with_server(|dbs| async move {
        namespace_with_rows("a").await;
        table_root_page("a").await;
        // The header's magic string.
        for at in 0..16 {
            corrupt(&dbs.join("a/data"), at);
        }
        let verdict = check("a", "").await;
        assert_eq!(verdict["ok"], false, "{verdict}");
        assert!(verdict["repair"] == "rebuild-data" || verdict["repair"] == "restore-from-backup", "{verdict}");
        let (status, answer) = reset("a").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{answer}");
        assert_eq!(answer["code"], "DATA_CORRUPT", "{answer}");
        // Other namespaces serve on.
        namespace_with_rows("b").await;
        assert_eq!(all_rows("b").await.len(), 200);
        Ok(())
    });
}

async fn rebuild(ns: &str) -> (StatusCode, Value) {
    admin(Method::POST, &format!("/v1/namespaces/{ns}/rebuild-data"), "").await
}

/// Mode B repaired: a corrupt b-tree page of the data file, a log that verifies. The data
/// file is rebuilt from the log, online; the log (and so every replica) is unchanged.
#[test]
fn corrupt_data_is_rebuilt_from_the_log() {
    with_server(|dbs| async move {
        namespace_with_rows("a").await;
        exec("a", "UPDATE t SET v = x'01' WHERE id % 7 = 0").await;
        let before = all_rows("a").await;
        let root = table_root_page("a").await;
        let log = stats("a").await["replication"].clone();
        corrupt(&dbs.join("a/data"), (root - 1) * 4096);
        assert_eq!(check("a", "").await["repair"], "rebuild-data");

        let (status, answer) = rebuild("a").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert!(answer["elapsed_ms"].is_u64() && answer["pages"].as_u64().unwrap() > 50, "{answer}");
        assert_eq!(check("a", r#"{"full": true}"#).await["repair"], "none");
        assert_eq!(all_rows("a").await, before);
        let now = stats("a").await["replication"].clone();
        assert_eq!((&now["log_id"], &now["last_frame_no"]), (&log["log_id"], &log["last_frame_no"]), "the log is unchanged");
        // Writes go on, into the same log.
        exec("a", "INSERT INTO t VALUES (1000, x'02')").await;
        assert_replays_to_data(&dbs.join("a"));
        Ok(())
    });
}

/// Mode B with a header so damaged that the namespace cannot open: rebuilt while unloaded.
#[test]
fn a_data_file_with_a_corrupt_header_is_rebuilt_from_the_log() {
    with_server(|dbs| async move {
        namespace_with_rows("a").await;
        let before = all_rows("a").await;
        table_root_page("a").await;
        for at in 0..16 {
            corrupt(&dbs.join("a/data"), at);
        }
        let (status, answer) = rebuild("a").await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(check("a", r#"{"full": true}"#).await["repair"], "none");
        assert_eq!(all_rows("a").await, before);
        assert_replays_to_data(&dbs.join("a"));
        Ok(())
    });
}

/// No rebuild from a log that does not verify: 409 and the data file is left as it was.
#[test]
fn rebuild_data_refuses_a_corrupt_log_and_changes_nothing() {
    with_server(|dbs| async move {
        namespace_with_rows("a").await;
        let root = table_root_page("a").await;
        corrupt(&dbs.join("a/data"), (root - 1) * 4096);
        corrupt(&dbs.join("a/wallog"), 64 + 5 * 4120 + 24 + 7);
        let data = std::fs::read(dbs.join("a/data")).unwrap();
        let (status, answer) = rebuild("a").await;
        assert_eq!(status, StatusCode::CONFLICT, "{answer}");
        assert_eq!(answer["code"], "LOG_CORRUPT");
        assert_eq!(std::fs::read(dbs.join("a/data")).unwrap(), data, "the data file is unchanged");
        let (status, _) = rebuild("missing").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        Ok(())
    });
}

/// Resets racing checkpoints, writes, evictions (one namespace loaded at a time) and a delete
/// leave every namespace consistent: its log verifies, replays to its data, and it serves.
#[test]
fn resets_racing_checkpoints_writes_evictions_and_a_delete_leave_consistent_namespaces() {
    let mut sim = sim();
    let dir = start_server(&mut sim, "primary", |config| config.max_active_namespaces = 1);
    let dbs = dir.path().join("dbs");
    sim.client("client", async move {
        namespace_with_rows("a").await;
        namespace_with_rows("b").await;
        let resets = tokio::spawn(async {
            let mut codes = Vec::new();
            for _ in 0..5 {
                codes.push(reset("a").await.0);
            }
            codes
        });
        let checkpoints = tokio::spawn(async {
            for _ in 0..5 {
                admin(Method::POST, "/v1/namespaces/a/checkpoint", "").await;
            }
        });
        let traffic = tokio::spawn(async {
            for i in 0..10 {
                // Each touch of `b` evicts `a`, and the next touch of `a` loads it again.
                exec("a", &format!("INSERT INTO t VALUES ({}, x'01')", 10_000 + i)).await;
                all_rows("b").await;
            }
        });
        let codes = resets.await.unwrap();
        checkpoints.await.unwrap();
        traffic.await.unwrap();
        assert!(codes.iter().all(|c| *c == StatusCode::OK || *c == StatusCode::SERVICE_UNAVAILABLE), "{codes:?}");
        assert!(codes.contains(&StatusCode::OK), "{codes:?}");
        assert_eq!(all_rows("a").await.len(), 210);
        assert_eq!(check("a", r#"{"full": true}"#).await["repair"], "none");
        assert_replays_to_data(&dbs.join("a"));

        // A delete racing a reset: either comes first (a delete waits for a reset in flight);
        // the name is then free and clean.
        let racing = tokio::spawn(async { reset("a").await.0 });
        let (deleted, _) = admin(Method::DELETE, "/v1/namespaces/a", "").await;
        let code = racing.await.unwrap();
        assert_eq!(deleted, StatusCode::OK);
        assert!([StatusCode::OK, StatusCode::NOT_FOUND].contains(&code), "{code}");
        namespace_with_rows("a").await;
        assert_eq!(all_rows("a").await.len(), 200);
        assert_eq!(check("a", "").await["repair"], "none");
        assert_eq!(check("b", "").await["repair"], "none");
        Ok(())
    });
    sim.run().unwrap();
}
