//! Tenant isolation: client SQL of one namespace cannot open another's files (or any file),
//! change process-wide state, or leave state on a pooled connection for the next request.

use std::path::Path;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::*;

fn execute_with(sql: &str, args: Value) -> Value {
    json!({"type": "execute", "stmt": {"sql": sql, "args": args}})
}

fn text(s: &str) -> Value {
    json!({"type": "text", "value": s})
}

async fn one(ns: &str, request: Value) -> Value {
    let (status, answer) = pipeline(ns, json!({"requests": [request, close()]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

async fn setup_two_tenants() {
    for ns in ["a", "b"] {
        let (status, _) = admin(Method::POST, &format!("/v1/namespaces/{ns}/create"), "").await;
        assert_eq!(status, StatusCode::OK);
        let (_, answer) = pipeline(ns, json!({"requests": [
            execute("CREATE TABLE t (owner)"),
            execute(&format!("INSERT INTO t VALUES ('{ns}')")),
            close()
        ]}))
        .await;
        assert_eq!(answer["results"][1]["type"], "ok", "{answer}");
    }
}

async fn owners(ns: &str) -> Vec<Value> {
    rows(&one(ns, execute("SELECT owner FROM t ORDER BY rowid")).await, 0)
}

#[test]
fn attach_is_refused_in_every_form_and_no_file_is_opened_or_created() {
    let mut sim = sim();
    let dir = start_server(&mut sim, "primary", |_| {});
    let root = dir.path().to_owned();
    sim.client("client", async move {
        setup_two_tenants().await;
        let b_data = root.join("dbs/b/data");
        let b = b_data.to_str().unwrap();
        let stray = root.join("stray.db");
        let stray = stray.to_str().unwrap();
        let attempts = [
            execute(&format!("ATTACH '{b}' AS o")),
            execute(&format!("ATTACH (SELECT '{b}') AS o")),
            execute(&format!("ATTACH '{b}' || '' AS o")),
            execute_with("ATTACH ? AS o", json!([text(b)])),
            execute(&format!("ATTACH 'file:{b}?mode=ro' AS o")),
            execute(&format!("ATTACH '{stray}' AS o")),
            execute(&format!("ATTACH (SELECT '{stray}') AS o")),
            execute("ATTACH '' AS o"),
            execute("ATTACH ':memory:' AS o"),
            execute(&format!("VACUUM INTO '{stray}'")),
            execute_with("VACUUM INTO ?", json!([text(stray)])),
        ];
        for attempt in attempts {
            let (_, answer) = pipeline("a", json!({"requests": [
                attempt.clone(),
                execute("INSERT INTO o.t VALUES ('a wrote this')"),
                execute("SELECT owner FROM o.t"),
                close()
            ]}))
            .await;
            assert_eq!(error_code(&answer, 0), "SQLITE_AUTH", "{attempt}: {answer}");
            assert_eq!(answer["results"][1]["type"], "error", "{attempt}: {answer}");
            assert_eq!(answer["results"][2]["type"], "error", "{attempt}: {answer}");
        }
        // The statement that is allowed to attach a scratch database: a plain VACUUM.
        assert_eq!(one("a", execute("VACUUM")).await["results"][0]["type"], "ok");
        assert!(!Path::new(stray).exists(), "a client created a file outside its namespace");
        assert_eq!(owners("a").await, vec![json!([text("a")])]);
        assert_eq!(owners("b").await, vec![json!([text("b")])]);
        Ok(())
    });
    sim.run().unwrap();
}

#[test]
fn process_wide_and_server_settings_cannot_be_changed_from_sql() {
    run_sim(|_| {}, async {
        setup_two_tenants().await;
        let before = rows(&one("b", execute("PRAGMA hard_heap_limit")).await, 0);
        for sql in [
            "PRAGMA hard_heap_limit = 2000000",
            "PRAGMA soft_heap_limit = 1000",
            "PRAGMA temp_store_directory = '/tmp'",
            "PRAGMA data_store_directory = '/tmp'",
            "PRAGMA threads = 8",
            "PRAGMA mmap_size = 1000000000",
            "PRAGMA cache_size = -100000000",
            "PRAGMA busy_timeout = 100000000",
            "PRAGMA trusted_schema = ON",
            "PRAGMA schema_version = 1",
            "PRAGMA main.journal_mode = OFF",
            "PRAGMA no_such_pragma",
        ] {
            let answer = one("a", execute(sql)).await;
            assert_eq!(error_code(&answer, 0), "SQLITE_AUTH", "{sql}: {answer}");
        }
        // The table-valued forms take no argument for these; a denied function is an error too.
        for sql in ["SELECT * FROM pragma_hard_heap_limit(2000000)", "SELECT * FROM pragma_soft_heap_limit(1000)", "SELECT load_extension('x')"] {
            assert_eq!(one("a", execute(sql)).await["results"][0]["type"], "error", "{sql}");
        }
        assert_eq!(rows(&one("b", execute("PRAGMA hard_heap_limit")).await, 0), before);
        assert_eq!(owners("b").await, vec![json!([text("b")])]);
        // Queries about the client's own database stay allowed, with or without arguments.
        for sql in ["PRAGMA table_info(t)", "SELECT * FROM pragma_table_info('t')", "PRAGMA integrity_check", "PRAGMA user_version = 7"] {
            assert_eq!(one("a", execute(sql)).await["results"][0]["type"], "ok", "{sql}");
        }
        Ok(())
    });
}

#[test]
fn connection_state_a_client_changes_does_not_reach_the_next_request() {
    run_sim(|_| {}, async {
        setup_two_tenants().await;
        let foreign_keys = rows(&one("a", execute("PRAGMA foreign_keys")).await, 0);
        let answer = one("a", execute("PRAGMA query_only = 1")).await;
        assert_eq!(answer["results"][0]["type"], "ok", "a per-connection preference is allowed: {answer}");
        let (_, answer) = pipeline("a", json!({"requests": [
            execute("CREATE TEMP TABLE scratch (x)"),
            execute("CREATE TEMP TRIGGER no_more BEFORE INSERT ON main.t BEGIN SELECT RAISE(ABORT, 'stale trigger'); END"),
            execute(if foreign_keys[0][0]["value"] == "1" { "PRAGMA foreign_keys = OFF" } else { "PRAGMA foreign_keys = ON" }),
            close()
        ]}))
        .await;
        for i in 0..3 {
            assert_eq!(answer["results"][i]["type"], "ok", "{answer}");
        }
        for i in 0..3 {
            let answer = one("a", execute(&format!("INSERT INTO t VALUES ('next {i}')"))).await;
            assert_eq!(answer["results"][0]["type"], "ok", "insert {i} saw an earlier request's state: {answer}");
            let answer = one("a", execute("SELECT count(*) FROM temp.scratch")).await;
            assert_eq!(error_code(&answer, 0), "SQLITE_ERROR", "a temporary table outlived its stream: {answer}");
            assert_eq!(rows(&one("a", execute("PRAGMA foreign_keys")).await, 0), foreign_keys);
        }
        assert_eq!(owners("a").await.len(), 4);
        Ok(())
    });
}

#[test]
fn statements_that_write_behind_a_read_only_face_take_the_write_lock() {
    run_sim(|config| config.write_lock_timeout_ms = 300, async {
        setup_two_tenants().await;
        let (_, answer) = pipeline("a", json!({"requests": [
            execute("CREATE INDEX t_owner ON t (owner)"),
            execute("INSERT INTO t SELECT 'x' || value FROM generate_series(1, 2000)"),
            execute("SELECT count(*) FROM t WHERE owner = 'x5'"),
            close()
        ]}))
        .await;
        assert_eq!(answer["results"][2]["type"], "ok", "{answer}");
        // PRAGMA optimize runs an ANALYZE inside a statement SQLite calls read-only: it commits
        // (so it held the write gate: a commit without it is rolled back).
        let answer = one("a", execute("PRAGMA optimize")).await;
        assert_eq!(answer["results"][0]["type"], "ok", "{answer}");
        let stats = rows(&one("a", execute("SELECT count(*) FROM sqlite_stat1")).await, 0);
        assert_ne!(stats, vec![json!([{"type": "integer", "value": "0"}])], "ANALYZE's results were committed");

        // A write transaction opened by a text that does not start with BEGIN holds the gate:
        // the next writer queues on it (and times out on it), not on SQLite's lock.
        let (_, held) = pipeline("a", json!({"requests": [execute(";BEGIN IMMEDIATE")]})).await;
        assert_eq!(held["results"][0]["type"], "ok", "{held}");
        let answer = one("a", execute("INSERT INTO t VALUES ('queued')")).await;
        assert_eq!(error_code(&answer, 0), "SQLITE_BUSY");
        let message = answer["results"][0]["error"]["message"].as_str().unwrap();
        assert!(message.contains("write lock"), "the writer waited on the gate: {message}");
        let (_, closed) = pipeline("a", json!({"baton": held["baton"], "requests": [execute("ROLLBACK"), close()]})).await;
        assert_eq!(closed["results"][0]["type"], "ok", "{closed}");
        Ok(())
    });
}

#[test]
fn values_temporary_tables_and_costly_functions_are_bounded() {
    run_sim(|_| {}, async {
        setup_two_tenants().await;
        let answer = one("a", execute("SELECT length(randomblob(100000000))")).await;
        assert_eq!(error_code(&answer, 0), "SQLITE_TOOBIG");
        for sql in [
            "SELECT osa_distance('kitten', 'sitting')",
            "SELECT dlevenshtein('a', 'b')",
            "SELECT levenshtein('a', 'b')",
            "SELECT length(lpad('', 2000000000, 'x'))",
            "SELECT length(repeat('ab', 1000000000))",
            "SELECT * FROM pragma_optimize",
        ] {
            assert_eq!(one("a", execute(sql)).await["results"][0]["type"], "error", "{sql}");
        }
        assert_eq!(error_code(&one("a", execute("PRAGMA temp_store = MEMORY")).await, 0), "SQLITE_AUTH");
        let answer = one("a", execute("CREATE TEMP TABLE big AS SELECT randomblob(1000000) AS v FROM generate_series(1, 40)")).await;
        assert_eq!(error_code(&answer, 0), "SQLITE_FULL", "{answer}");
        assert_eq!(owners("a").await, vec![json!([text("a")])]);
        Ok(())
    });
}
