//! Hrana over HTTP under turmoil: streams and batons, every request kind, value types.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::*;

const DEFAULT_NS: &[(&str, &str)] = &[("x-namespace", "default")];

fn count_rows(answer: &Value, i: usize) -> String {
    rows(answer, i)[0][0]["value"].as_str().unwrap().to_owned()
}

async fn count(ns: &str) -> String {
    let (_, answer) = pipeline(ns, json!({"requests": [execute("SELECT count(*) FROM t"), close()]})).await;
    count_rows(&answer, 0)
}

#[test]
fn interactive_transaction_spans_three_requests_and_commits() {
    run_sim(|_| {}, async {
        pipeline("default", json!({"requests": [execute("CREATE TABLE t (x)"), close()]})).await;

        let (status, first) = pipeline("default", json!({"requests": [execute("BEGIN"), execute("INSERT INTO t VALUES (1)")]})).await;
        assert_eq!(status, StatusCode::OK);
        let baton = first["baton"].as_str().expect("an open stream has a baton").to_owned();

        let (_, second) = pipeline("default", json!({"baton": baton, "requests": [execute("INSERT INTO t VALUES (2)"), {"type": "get_autocommit"}]})).await;
        assert_eq!(second["results"][1]["response"]["is_autocommit"], false);
        let baton2 = second["baton"].as_str().unwrap().to_owned();
        assert_ne!(baton, baton2, "every response hands out a fresh baton");
        // Another stream does not see the uncommitted rows.
        assert_eq!(count("default").await, "0");

        let (_, third) = pipeline("default", json!({"baton": baton2, "requests": [execute("COMMIT"), close()]})).await;
        assert_eq!(third["results"][0]["type"], "ok", "{third}");
        assert_eq!(third["baton"], Value::Null, "a closed stream has no baton");
        assert_eq!(count("default").await, "2");

        // A used baton is gone.
        let (status, body) = pipeline("default", json!({"baton": baton, "requests": [execute("SELECT 1")]})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "STREAM_UNKNOWN");
        Ok(())
    });
}

#[test]
fn interactive_transaction_rolls_back() {
    run_sim(|_| {}, async {
        pipeline("default", json!({"requests": [execute("CREATE TABLE t (x)"), close()]})).await;
        let (_, first) = pipeline("default", json!({"requests": [execute("BEGIN"), execute("INSERT INTO t VALUES (1)")]})).await;
        let baton = first["baton"].as_str().unwrap();
        let (_, second) = pipeline("default", json!({"baton": baton, "requests": [execute("INSERT INTO t VALUES (2)")]})).await;
        let baton = second["baton"].as_str().unwrap();
        let (_, third) = pipeline("default", json!({"baton": baton, "requests": [execute("ROLLBACK"), {"type": "get_autocommit"}, close()]})).await;
        assert_eq!(third["results"][1]["response"]["is_autocommit"], true);
        assert_eq!(count("default").await, "0");
        // The write lock was released by the rollback: a new writer gets in.
        let (_, answer) = pipeline("default", json!({"requests": [execute("INSERT INTO t VALUES (3)"), close()]})).await;
        assert_eq!(answer["results"][0]["type"], "ok");
        Ok(())
    });
}

#[test]
fn idle_stream_expires_rolls_back_and_releases_the_write_lock() {
    run_sim(
        |config| {
            config.stream_expiry_s = 1;
            config.write_lock_timeout_ms = 200;
        },
        async {
            pipeline("default", json!({"requests": [execute("CREATE TABLE t (x)"), close()]})).await;
            let (_, first) = pipeline("default", json!({"requests": [execute("BEGIN IMMEDIATE"), execute("INSERT INTO t VALUES (1)")]})).await;
            let baton = first["baton"].as_str().unwrap().to_owned();

            // While the transaction holds the write lock, another writer waits, then gets BUSY.
            let (_, blocked) = pipeline("default", json!({"requests": [execute("INSERT INTO t VALUES (2)"), close()]})).await;
            assert_eq!(error_code(&blocked, 0), "SQLITE_BUSY");

            // Simulated time passes beyond the stream expiry: the behaviour under test.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let (status, body) = pipeline("default", json!({"baton": baton, "requests": [execute("COMMIT")]})).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(body["code"], "STREAM_EXPIRED", "{body}");

            let (_, after) = pipeline("default", json!({"requests": [execute("INSERT INTO t VALUES (3)"), execute("SELECT x FROM t"), close()]})).await;
            assert_eq!(after["results"][0]["type"], "ok", "{after}");
            assert_eq!(rows(&after, 1), vec![json!([{"type": "integer", "value": "3"}])]);
            Ok(())
        },
    );
}

#[test]
fn values_of_every_type_round_trip() {
    run_sim(|_| {}, async {
        let insert = json!({"type": "execute", "stmt": {
            "sql": "INSERT INTO v VALUES (?, ?, ?, ?, :named)",
            "args": [
                {"type": "integer", "value": "-9223372036854775808"},
                {"type": "float", "value": 1.5},
                {"type": "text", "value": "héllo \"quoted\""},
                {"type": "blob", "base64": "AAEC/w"}
            ],
            "named_args": [{"name": "named", "value": {"type": "null"}}]
        }});
        let (_, answer) = pipeline("default", json!({"requests": [
            execute("CREATE TABLE v (i INTEGER, f REAL, t TEXT, b BLOB, n)"),
            insert,
            execute("SELECT i, f, t, b, n FROM v"),
            close()
        ]}))
        .await;
        assert_eq!(answer["results"][1]["response"]["result"]["affected_row_count"], 1);
        assert_eq!(
            rows(&answer, 2),
            vec![json!([
                {"type": "integer", "value": "-9223372036854775808"},
                {"type": "float", "value": 1.5},
                {"type": "text", "value": "héllo \"quoted\""},
                {"type": "blob", "base64": "AAEC/w"},
                {"type": "null"}
            ])]
        );
        let cols = &answer["results"][2]["response"]["result"]["cols"];
        assert_eq!(cols[0], json!({"name": "i", "decltype": "INTEGER"}));
        Ok(())
    });
}

#[test]
fn batch_conditions_sequence_describe_and_stored_sql() {
    run_sim(|_| {}, async {
        let batch = json!({"type": "batch", "batch": {"steps": [
            {"stmt": {"sql": "BEGIN"}},
            {"condition": {"type": "ok", "step": 0}, "stmt": {"sql": "INSERT INTO t VALUES (1)"}},
            {"condition": {"type": "ok", "step": 1}, "stmt": {"sql": "INSERT INTO missing VALUES (1)"}},
            {"condition": {"type": "and", "conds": [{"type": "ok", "step": 1}, {"type": "ok", "step": 2}]}, "stmt": {"sql": "COMMIT"}},
            {"condition": {"type": "not", "cond": {"type": "is_autocommit"}}, "stmt": {"sql": "ROLLBACK"}},
            {"condition": {"type": "or", "conds": [{"type": "error", "step": 2}, {"type": "ok", "step": 9}]}, "stmt": {"sql": "SELECT 1"}}
        ]}});
        let (_, answer) = pipeline("default", json!({"requests": [
            {"type": "sequence", "sql": "CREATE TABLE t (x); CREATE INDEX tx ON t (x);"},
            batch,
            {"type": "store_sql", "sql_id": 7, "sql": "SELECT count(*) FROM t WHERE x > ?"},
            {"type": "execute", "stmt": {"sql_id": 7, "args": [{"type": "integer", "value": "0"}]}},
            {"type": "describe", "sql": "SELECT x AS y FROM t WHERE x = :p"},
            {"type": "close_sql", "sql_id": 7},
            {"type": "execute", "stmt": {"sql_id": 7}},
            execute("SELECT 1; SELECT 2"),
            execute("  -- nothing\n"),
            close()
        ]}))
        .await;
        let result = &answer["results"][1]["response"]["result"];
        assert!(result["step_results"][1].is_object(), "{result}");
        assert_eq!(result["step_errors"][2]["code"], "SQLITE_ERROR");
        assert!(result["step_results"][3].is_null(), "COMMIT must be skipped: {result}");
        assert!(result["step_results"][4].is_object(), "ROLLBACK must run: {result}");
        assert_eq!(result["step_errors"][5]["code"], "BATCH_COND_INVALID", "a condition on a later step is refused: {result}");
        assert_eq!(count_rows(&answer, 3), "0", "the batch rolled back");
        let described = &answer["results"][4]["response"]["result"];
        assert_eq!(described["params"], json!([{"name": ":p"}]));
        assert_eq!(described["cols"][0]["name"], "y");
        assert_eq!(described["is_readonly"], true);
        assert_eq!(error_code(&answer, 6), "SQL_NOT_FOUND");
        assert_eq!(error_code(&answer, 7), "SQL_MANY_STATEMENTS");
        assert_eq!(error_code(&answer, 8), "SQL_NO_STATEMENT");
        Ok(())
    });
}

#[test]
fn cursor_streams_only_hrana3_entries() {
    run_sim(|_| {}, async {
        pipeline("default", json!({"requests": [execute("CREATE TABLE t (x)"), execute("INSERT INTO t VALUES (1), (2)"), close()]})).await;
        let body = json!({"batch": {"steps": [{"stmt": {"sql": "SELECT x FROM t ORDER BY x"}}, {"stmt": {"sql": "SELECT nope"}}]}});
        let (status, body) = call("primary", USER_PORT, Method::POST, "/v3/cursor", DEFAULT_NS, body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        let lines: Vec<Value> = String::from_utf8(body).unwrap().lines().map(|l| json(l.as_bytes())).collect();
        let types: Vec<&str> = lines[1..].iter().map(|l| l["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["step_begin", "row", "row", "step_end", "step_error"]);
        assert!(lines[0]["baton"].is_string());
        assert_eq!(lines[3]["row"], json!([{"type": "integer", "value": "2"}]));
        Ok(())
    });
}

#[test]
fn legacy_and_v1_routes_and_probes() {
    run_sim(|_| {}, async {
        let body = json!({"statements": ["CREATE TABLE t (x, y)", {"q": "INSERT INTO t VALUES (?, ?)", "params": [1, "a"]},
                                         {"q": "INSERT INTO t VALUES (:x, :y)", "params": {":x": 2.5, ":y": {"base64": "AAE="}}}, "SELECT * FROM t"]});
        let (status, answer) = call("primary", USER_PORT, Method::POST, "/", DEFAULT_NS, body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&answer)[3]["results"], json!({"columns": ["x", "y"], "rows": [[1, "a"], [2.5, {"base64": "AAE="}]]}));

        // A failing statement rolls the whole request back.
        let body = json!({"statements": ["INSERT INTO t VALUES (3, 3)", "INSERT INTO nope VALUES (1)"]});
        let (status, answer) = call("primary", USER_PORT, Method::POST, "/", DEFAULT_NS, body.to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(json(&answer)["error"].as_str().unwrap().contains("nope"));

        let (status, answer) = call("primary", USER_PORT, Method::POST, "/v1/execute", DEFAULT_NS, json!({"stmt": {"sql": "SELECT count(*) FROM t"}}).to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&answer)["result"]["rows"], json!([[{"type": "integer", "value": "2"}]]));
        let batch = json!({"batch": {"steps": [{"stmt": {"sql": "SELECT 1"}}, {"stmt": {"sql": "SELECT x FROM nope"}}]}});
        let (status, answer) = call("primary", USER_PORT, Method::POST, "/v1/batch", DEFAULT_NS, batch.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(json(&answer)["result"]["step_errors"][1]["code"], "SQLITE_ERROR");

        for probe in ["/health", "/v2", "/v3", "/version"] {
            assert_eq!(call("primary", USER_PORT, Method::GET, probe, &[], "").await.0, StatusCode::OK, "{probe}");
        }
        Ok(())
    });
}

#[test]
fn namespace_comes_from_headers_then_host() {
    run_sim(|_| {}, async {
        admin(Method::POST, "/v1/namespaces/tenant/create", "").await;
        pipeline("tenant", json!({"requests": [execute("CREATE TABLE only_in_tenant (x)"), close()]})).await;
        let probe = json!({"requests": [execute("SELECT count(*) FROM sqlite_master WHERE name = 'only_in_tenant'"), close()]}).to_string();
        // "dGVuYW50" is base64 for "tenant".
        for headers in [&[("x-namespace-bin", "dGVuYW50")][..], &[("x-namespace", "tenant")][..]] {
            let (status, body) = call("primary", USER_PORT, Method::POST, "/v3/pipeline", headers, probe.clone()).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(count_rows(&json(&body), 0), "1");
        }
        // The Host header (`primary`) names a namespace that does not exist.
        let (status, body) = call("primary", USER_PORT, Method::POST, "/v3/pipeline", &[], probe).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{}", String::from_utf8_lossy(&body));
        Ok(())
    });
}

/// Defects the Hrana clients' own test suites found: a statement that changed no row reports
/// no change and no rowid (not the last ones of the pooled connection, maybe another
/// request's), and a cursor's `last_insert_rowid` is a string, as Hrana's JSON has it.
#[test]
fn counters_belong_to_the_statement_and_cursor_rowids_are_strings() {
    run_sim(|_| {}, async {
        let (_, answer) = pipeline("default", json!({"requests": [
            execute("CREATE TABLE t (x)"),
            execute("INSERT INTO t VALUES (1)"),
            execute("DROP TABLE t"),
            execute("SELECT 1"),
        ]}))
        .await;
        let result = |i: usize| answer["results"][i]["response"]["result"].clone();
        assert_eq!((result(1)["affected_row_count"].clone(), result(1)["last_insert_rowid"].clone()), (json!(1), json!("1")), "{answer}");
        assert_eq!((result(2)["affected_row_count"].clone(), result(2)["last_insert_rowid"].clone()), (json!(0), Value::Null), "{answer}");
        assert_eq!(result(3)["last_insert_rowid"], Value::Null, "{answer}");
        // Another request on a pooled connection sees none of the insert's counters.
        let (_, other) = pipeline("default", json!({"requests": [execute("SELECT 2"), close()]})).await;
        assert_eq!(other["results"][0]["response"]["result"]["last_insert_rowid"], Value::Null, "{other}");

        let body = json!({"baton": null, "batch": {"steps": [
            {"stmt": {"sql": "CREATE TABLE c (x)"}},
            {"stmt": {"sql": "INSERT INTO c VALUES (1)"}},
        ]}});
        let (status, text) = call("primary", USER_PORT, Method::POST, "/v3/cursor", DEFAULT_NS, body.to_string()).await;
        assert_eq!(status, StatusCode::OK);
        let ends: Vec<Value> = String::from_utf8(text).unwrap().lines().skip(1).map(|l| serde_json::from_str::<Value>(l).unwrap()).filter(|e| e["type"] == "step_end").collect();
        assert_eq!(ends[0]["last_insert_rowid"], Value::Null, "{ends:?}");
        assert_eq!(ends[1]["last_insert_rowid"], "1", "{ends:?}");
        Ok(())
    });
}
