//! Replica mode: this server as a replica (`--primary-grpc-url`) of this server as primary,
//! both real processes. The replica copies a namespace on first use and follows it; reads are
//! served from its copy, writes and transactions go to the primary, and a stream reads its own
//! writes. It follows the primary through a log rebuild and a `kill -9`, resumes from its copy
//! after its own `kill -9`, serves many namespaces, and refuses what only a primary does.

use hyper::StatusCode;
use serde_json::{json, Value};

use crate::common::process::{metric, rows, Sqld};

const ALL: &str = "SELECT id, hex(v) FROM t ORDER BY id";

/// A pipeline request executing `sql`.
fn exec(sql: &str) -> Value {
    json!({"type": "execute", "stmt": {"sql": sql}})
}

/// The rows of the `n`-th result of a pipeline answer.
fn result_rows(answer: &Value, n: usize) -> &Value {
    &answer["results"][n]["response"]["result"]["rows"]
}

/// Waits (bounded) until the replica answers `sql` with exactly what the primary answers.
async fn assert_in_step(primary: &Sqld, replica: &Sqld, sql: &str) {
    let expected = rows(&primary.connect().await, sql).await;
    let conn = replica.connect().await;
    replica
        .wait_until("the replica holds the primary's rows", || {
            let (conn, expected) = (&conn, &expected);
            async move { rows(conn, sql).await == *expected }
        })
        .await;
}

/// A primary whose table `t` is filled by `fill` (an INSERT), a connection to it, and a
/// replica of it that holds the same rows.
async fn primary_and_replica(fill: &str) -> (Sqld, libsql::Connection, Sqld) {
    let primary = Sqld::start(&[]);
    let conn = primary.connect().await;
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    conn.execute(fill, ()).await.unwrap();
    let replica = Sqld::replica_of(&primary, &[]);
    assert_in_step(&primary, &replica, ALL).await;
    (primary, conn, replica)
}

async fn count_on(sqld: &Sqld) -> i64 {
    let (status, answer) = sqld.pipeline(json!({"requests": [exec("SELECT count(*) FROM t")]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    result_rows(&answer, 0)[0][0]["value"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_reads_from_its_copy_and_sends_writes_and_transactions_to_the_primary() {
    let (primary, _, replica) = primary_and_replica("INSERT INTO t SELECT value, randomblob(100) FROM generate_series(1, 20000)").await;

    // A write through the replica lands on the primary, and the same stream reads it at once,
    // in the same request and in the next one (by its baton).
    let (status, answer) = replica
        .pipeline(json!({"requests": [exec("INSERT INTO t VALUES (30001, x'01')"), exec("SELECT hex(v) FROM t WHERE id = 30001")]}))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["results"][0]["response"]["result"]["affected_row_count"], 1, "{answer}");
    assert_eq!(result_rows(&answer, 1), &json!([[{"type": "text", "value": "01"}]]), "{answer}");
    let baton = answer["baton"].as_str().unwrap().to_owned();
    let (_, answer) = replica.pipeline(json!({"requests": [exec("INSERT INTO t VALUES (30002, x'02')")], "baton": baton})).await;
    let baton = answer["baton"].as_str().unwrap().to_owned();
    let (_, answer) = replica.pipeline(json!({"requests": [exec("SELECT count(*) FROM t WHERE id > 30000")], "baton": baton})).await;
    assert_eq!(result_rows(&answer, 0), &json!([[{"type": "integer", "value": "2"}]]), "{answer}");
    assert_eq!(count_on(&primary).await, 20002);

    // An interactive transaction through the replica reads its own uncommitted write; rolled
    // back, it leaves nothing on the primary; committed, its rows are there.
    let (_, answer) = replica
        .pipeline(json!({"requests": [exec("BEGIN"), exec("INSERT INTO t VALUES (30003, x'03')"), exec("SELECT count(*) FROM t"), {"type": "get_autocommit"}]}))
        .await;
    assert_eq!(result_rows(&answer, 2), &json!([[{"type": "integer", "value": "20003"}]]), "{answer}");
    assert_eq!(answer["results"][3]["response"]["is_autocommit"], false, "{answer}");
    let baton = answer["baton"].as_str().unwrap().to_owned();
    let (_, answer) = replica.pipeline(json!({"requests": [exec("ROLLBACK"), {"type": "get_autocommit"}], "baton": baton})).await;
    assert_eq!(answer["results"][1]["response"]["is_autocommit"], true, "{answer}");
    assert_eq!(count_on(&primary).await, 20002);
    let (_, answer) = replica
        .pipeline(json!({"requests": [exec("BEGIN"), exec("INSERT INTO t VALUES (30004, x'04')"), exec("COMMIT"), exec("SELECT count(*) FROM t")]}))
        .await;
    assert_eq!(result_rows(&answer, 3), &json!([[{"type": "integer", "value": "20003"}]]), "{answer}");
    assert_eq!(count_on(&primary).await, 20003);

    // A sequence whose statements depend on each other (the copy cannot prepare the second
    // before the first ran) goes whole to the primary, statement by statement.
    let sequence =
        json!({"type": "sequence", "sql": "CREATE TABLE s (x); INSERT INTO s VALUES ('a;b'); -- done\nINSERT INTO s VALUES (2);"});
    let (_, answer) = replica.pipeline(json!({"requests": [sequence, exec("SELECT count(*) FROM s")]})).await;
    assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
    assert_eq!(result_rows(&answer, 1), &json!([[{"type": "integer", "value": "2"}]]), "{answer}");
    // A trigger on a table the same sequence creates: its body's `;` do not split it.
    let sql = "CREATE TABLE u (x); CREATE TRIGGER tr AFTER INSERT ON u BEGIN INSERT INTO s VALUES ('t;1'); INSERT INTO s VALUES (3); END; INSERT INTO u VALUES (1);";
    let (_, answer) = replica.pipeline(json!({"requests": [{"type": "sequence", "sql": sql}, exec("SELECT count(*) FROM s")]})).await;
    assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
    assert_eq!(result_rows(&answer, 1), &json!([[{"type": "integer", "value": "4"}]]), "{answer}");

    // A statement error on the primary comes back as the client's error, with SQLite's code.
    let (_, answer) = replica.pipeline(json!({"requests": [exec("INSERT INTO t VALUES (1, x'00')")]})).await;
    assert_eq!(answer["results"][0]["error"]["code"], "SQLITE_CONSTRAINT", "{answer}");

    // The libsql crate over HTTP, unchanged, against the replica (each of its calls outside a
    // transaction is a stream of its own, so its reads follow the copy): a write, then the
    // replica has it.
    let client = replica.connect().await;
    client.execute("INSERT INTO t VALUES (30005, x'05')", ()).await.unwrap();
    assert_eq!(count_on(&primary).await, 20004);
    assert_in_step(&primary, &replica, ALL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_answers_for_its_copy_and_refuses_what_only_a_primary_does() {
    let (primary, conn, replica) = primary_and_replica("INSERT INTO t VALUES (1, x'01')").await;

    let last = primary.admin_get("/v1/namespaces/default/stats").await["replication"]["last_frame_no"].clone();
    let stats = replica.admin_get("/v1/namespaces/default/stats").await;
    assert_eq!(stats["replica"]["replicated_index"], last, "{stats}");
    assert_eq!(stats["replica"]["lag_frames"], 0, "{stats}");
    assert!(stats.get("replication").is_none(), "{stats}");
    assert_eq!(metric(&replica, "sqld_replica_lag_frames{namespace=\"default\"}").await, 0);
    assert_eq!(metric(&replica, "sqld_replica_replicated_index{namespace=\"default\"}").await, last.as_u64().unwrap());

    // reset-replication: 400, and the copy is as it was.
    let index = std::fs::read(replica.db_path().join("dbs/default/client_wal_index")).unwrap();
    for path in ["/v1/namespaces/default/reset-replication", "/v1/namespaces/default/rebuild-data", "/v1/namespaces/other/create"] {
        let (status, body) = replica.admin_post(path).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{path}: {body}");
        assert_eq!(body["code"], "NOT_PRIMARY", "{path}: {body}");
    }
    assert_eq!(std::fs::read(replica.db_path().join("dbs/default/client_wal_index")).unwrap(), index);
    assert_eq!(rows(&replica.connect().await, ALL).await, rows(&conn, ALL).await);

    // integrity-check judges the local copy.
    let (status, verdict) = replica.admin_post("/v1/namespaces/default/integrity-check").await;
    assert_eq!(status, StatusCode::OK, "{verdict}");
    assert_eq!(verdict["ok"], true, "{verdict}");
    assert_eq!(verdict["repair"], "none", "{verdict}");
    assert_eq!(verdict["replication_log"]["frame_no"], last, "{verdict}");

    // Sync v2 comes from the primary, not from a replica.
    let info = hyper::Client::new().get(format!("{}/info", replica.url()).parse().unwrap()).await.unwrap();
    assert_eq!(info.status(), StatusCode::BAD_REQUEST);

    // Both roles at once are refused at start.
    let both = std::process::Command::new(env!("CARGO_BIN_EXE_sqld"))
        .args(["--db-path", &replica.dir.path().join("both").to_string_lossy()])
        .args(["--primary-grpc-url", "http://127.0.0.1:1", "--grpc-listen-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!both.status.success());
    assert!(String::from_utf8_lossy(&both.stderr).contains("--grpc-listen-addr"), "{}", String::from_utf8_lossy(&both.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_a_rebuild_and_a_kill_of_the_primary_and_resumes_from_its_copy_after_its_own_kill() {
    let (mut primary, conn, mut replica) =
        primary_and_replica("INSERT INTO t SELECT value, randomblob(200) FROM generate_series(1, 20000)").await;

    // The replica's kill -9: it resumes from its copy, taking only what it lacks.
    replica.signal("KILL");
    conn.execute("INSERT INTO t VALUES (20001, x'01')", ()).await.unwrap();
    let served = metric(&primary, "sqld_replication_frames_served_total{namespace=\"default\"}").await;
    let snapshots = metric(&primary, "sqld_replication_snapshots_served_total{namespace=\"default\"}").await;
    replica.respawn_replica_of(&primary, &[]);
    assert_in_step(&primary, &replica, ALL).await;
    let resumed = metric(&primary, "sqld_replication_frames_served_total{namespace=\"default\"}").await - served;
    assert!(resumed < 100, "the replica downloaded {resumed} frames to resume");
    assert_eq!(metric(&primary, "sqld_replication_snapshots_served_total{namespace=\"default\"}").await, snapshots);

    // A log rebuild on the primary (a new log): the replica starts over from it by itself.
    let (status, body) = primary.admin_post("/v1/namespaces/default/reset-replication").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    conn.execute("DELETE FROM t WHERE id % 3 = 0", ()).await.unwrap();
    assert_in_step(&primary, &replica, ALL).await;

    // The primary's kill -9 (a dirty restart: its log is rebuilt): the replica follows, and
    // writes through it land.
    primary.signal("KILL");
    primary.spawn(&[]);
    replica.connect().await.execute("INSERT INTO t VALUES (20002, x'02')", ()).await.unwrap();
    primary.connect().await.execute("UPDATE t SET v = x'03' WHERE id = 1", ()).await.unwrap();
    assert_in_step(&primary, &replica, ALL).await;
    assert_eq!(rows(&primary.connect().await, "SELECT count(*) FROM t WHERE id = 20002").await, vec![vec![libsql::Value::Integer(1)]]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_serves_many_namespaces_each_copied_on_first_use() {
    let primary = Sqld::start(&["--enable-namespaces"]);
    let names: Vec<String> = (0..6).map(|i| format!("tenant{i}")).collect();
    for (i, name) in names.iter().enumerate() {
        let (status, body) = primary.admin_post(&format!("/v1/namespaces/{name}/create")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let insert = format!("INSERT INTO t SELECT value, {i} FROM generate_series(1, {})", 10 * (i + 1));
        let (status, body) =
            primary.pipeline_as(name, None, json!({"requests": [exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v)"), exec(&insert)]})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let replica = Sqld::replica_of(&primary, &["--enable-namespaces", "--max-active-namespaces", "3"]);
    for round in 0..2 {
        for (i, name) in names.iter().enumerate() {
            // A fresh stream reads the copy, which may lag the primary (a write of the round
            // before, made on another stream): polled until it has it.
            let expected = 10 * (i + 1) + round;
            replica
                .wait_until("the replica's copy holds the tenant's rows", || async {
                    let (status, answer) = replica.pipeline_as(name, None, json!({"requests": [exec("SELECT count(*) FROM t")]})).await;
                    assert_eq!(status, StatusCode::OK, "{answer}");
                    result_rows(&answer, 0)[0][0]["value"] == expected.to_string()
                })
                .await;
            // A write to this tenant through the replica, read back at once.
            let insert = format!("INSERT INTO t VALUES ({}, {i})", 1000 + round);
            let (_, answer) = replica.pipeline_as(name, None, json!({"requests": [exec(&insert), exec("SELECT count(*) FROM t")]})).await;
            assert_eq!(result_rows(&answer, 1)[0][0]["value"], (expected + 1).to_string(), "{name}: {answer}");
        }
    }
    // A namespace the primary does not have: 404, and nothing left behind on the replica.
    let (status, answer) = replica.pipeline_as("nosuch", None, json!({"requests": [exec("SELECT 1")]})).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{answer}");
    assert!(!replica.db_path().join("dbs/nosuch").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_obeys_the_namespace_key_the_primary_gives_and_never_lets_a_read_only_grant_write() {
    let signer = crate::common::tokens::Signer::generate();
    let full = signer.token(json!({}));
    let read_only = signer.token(json!({"a": "ro"}));
    let primary = Sqld::start(&["--enable-namespaces"]);
    let request = hyper::Request::post(format!("http://{}/v1/namespaces/locked/create", primary.admin))
        .body(hyper::Body::from(json!({"jwt_key": signer.raw()}).to_string()))
        .unwrap();
    assert_eq!(hyper::Client::new().request(request).await.unwrap().status(), StatusCode::OK);
    let create = json!({"requests": [exec("CREATE TABLE t (id INTEGER PRIMARY KEY, v)"), exec("INSERT INTO t VALUES (1, 'secret')")]});
    assert_eq!(primary.pipeline_as("locked", Some(&full), create).await.0, StatusCode::OK);

    // The replica has no key of its own: the namespace's key comes from the primary, before
    // its first request is let in.
    let replica = Sqld::replica_of(&primary, &["--enable-namespaces", "--primary-auth-token", &full]);
    let read = json!({"requests": [exec("SELECT v FROM t")]});
    let (status, answer) = replica.pipeline_as("locked", None, read.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{answer}");
    let (status, answer) = replica.pipeline_as("locked", Some(&read_only), read).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(result_rows(&answer, 0), &json!([[{"type": "text", "value": "secret"}]]), "{answer}");

    // A read-only grant writes nothing: not alone, not inside a transaction another grant
    // began on the same stream (whose statements all go to the primary).
    let (_, answer) = replica.pipeline_as("locked", Some(&read_only), json!({"requests": [exec("INSERT INTO t VALUES (2, 'ro')")]})).await;
    assert_eq!(answer["results"][0]["error"]["code"], "AUTH_READ_ONLY", "{answer}");
    let (_, answer) =
        replica.pipeline_as("locked", Some(&full), json!({"requests": [exec("BEGIN"), exec("INSERT INTO t VALUES (3, 'rw')")]})).await;
    assert_eq!(answer["results"][1]["type"], "ok", "{answer}");
    let baton = answer["baton"].as_str().unwrap().to_owned();
    let body = json!({"baton": baton, "requests": [exec("INSERT INTO t VALUES (4, 'ro')"), exec("COMMIT")]});
    let (_, answer) = replica.pipeline_as("locked", Some(&read_only), body).await;
    assert_eq!(answer["results"][0]["error"]["code"], "AUTH_READ_ONLY", "{answer}");
    assert_eq!(answer["results"][1]["error"]["code"], "AUTH_READ_ONLY", "{answer}");
    let baton = answer["baton"].as_str().unwrap().to_owned();
    let (_, answer) = replica.pipeline_as("locked", Some(&full), json!({"baton": baton, "requests": [exec("COMMIT")]})).await;
    assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
    let (_, answer) = primary.pipeline_as("locked", Some(&full), json!({"requests": [exec("SELECT group_concat(id) FROM t")]})).await;
    assert_eq!(result_rows(&answer, 0)[0][0]["value"], "1,3", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_primary_lost_runs_none_of_its_later_statements() {
    let primary = Sqld::start(&["--stream-expiry-s", "1"]);
    primary.connect().await.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v)", ()).await.unwrap();
    let replica = Sqld::replica_of(&primary, &["--stream-expiry-s", "60"]);
    let (_, answer) = replica.pipeline(json!({"requests": [exec("BEGIN"), exec("INSERT INTO t VALUES (1, 'a')")]})).await;
    assert_eq!(answer["results"][1]["type"], "ok", "{answer}");
    let baton = answer["baton"].as_str().unwrap().to_owned();
    // The primary expires the transaction it held for the replica's stream.
    primary
        .wait_until("the primary expired the idle transaction", || async { metric(&primary, "sqld_hrana_streams_parked").await == 0 })
        .await;
    let body =
        json!({"baton": baton, "requests": [exec("INSERT INTO t VALUES (2, 'b')"), exec("INSERT INTO t VALUES (3, 'c')"), exec("COMMIT")]});
    let (_, answer) = replica.pipeline(body).await;
    for n in 0..3 {
        assert_eq!(answer["results"][n]["type"], "error", "{answer}");
    }
    assert_eq!(answer["results"][0]["error"]["code"], "STREAM_EXPIRED", "{answer}");
    assert_eq!(count_on(&primary).await, 0, "no statement of the lost transaction ran on its own");
    // A new stream works.
    let (_, answer) = replica.pipeline(json!({"requests": [exec("INSERT INTO t VALUES (4, 'd')")]})).await;
    assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_the_primary_refuses_to_copy_fail_fast_and_do_not_hold_up_the_others() {
    let signer = crate::common::tokens::Signer::generate();
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("key.pem");
    std::fs::write(&key_file, signer.pem()).unwrap();
    let key = key_file.to_str().unwrap().to_owned();
    let primary = Sqld::start(&["--enable-namespaces", "--auth-jwt-key-file", &key]);
    let names: Vec<String> = (0..20).map(|i| format!("other{i}")).chain(["mine".to_owned()]).collect();
    for name in &names {
        assert_eq!(primary.admin_post(&format!("/v1/namespaces/{name}/create")).await.0, StatusCode::OK);
    }
    // The replica's token grants one namespace only: the primary refuses to copy the others.
    let token = signer.token(json!({"id": "mine"}));
    let replica = Sqld::replica_of(&primary, &["--enable-namespaces", "--auth-jwt-key-file", &key, "--primary-auth-token", &token]);
    let user = signer.token(json!({}));
    let read = json!({"requests": [exec("SELECT 1")]});
    for name in &names[..20] {
        let started = std::time::Instant::now();
        let (status, answer) = replica.pipeline_as(name, Some(&user), read.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{name}: {answer}");
        assert_eq!(answer["code"], "REPLICA_BOOTSTRAPPING", "{answer}");
        assert!(started.elapsed() < std::time::Duration::from_secs(20), "{name}: waited {:?}", started.elapsed());
    }
    // More refused namespaces than copies may run at once, and the one it may copy still is.
    let (status, answer) = replica.pipeline_as("mine", Some(&user), read).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}
