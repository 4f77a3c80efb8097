//! Bad input on the user API: every mistake is a 4xx JSON error and the server goes on serving.

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::common::*;

async fn post_pipeline(headers: &[(&str, &str)], body: impl Into<hyper::Body>) -> (StatusCode, serde_json::Value) {
    let (status, body) = call("primary", USER_PORT, Method::POST, "/v2/pipeline", headers, body).await;
    (status, json(&body))
}

async fn still_serving() {
    let (status, answer) = pipeline("default", json!({"requests": [execute("SELECT 1"), close()]})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer["results"][0]["type"], "ok");
}

const NS: &[(&str, &str)] = &[("x-namespace", "default")];

#[test]
fn malformed_and_mistyped_bodies_are_400() {
    run_sim(|_| {}, async {
        let cases = [
            ("{not json", "malformed JSON"),
            ("", "empty body"),
            (r#"{"requests": "nope"}"#, "requests not an array"),
            (r#"{"requests": [{"type": "execute", "stmt": {"sql": 42}}]}"#, "sql not a string"),
            (r#"{"requests": [{"type": "execute", "stmt": {"sql": "SELECT ?", "args": [{"type": "integer", "value": 1}]}}]}"#, "integer not as string"),
            (r#"{"requests": [{"type": "execute", "stmt": {"sql": "SELECT ?", "args": [{"type": "blob", "base64": "@@"}]}}]}"#, "bad base64"),
            (r#"{"requests": [{"type": "teleport"}]}"#, "unknown request type"),
            (r#"{"baton": 5, "requests": []}"#, "baton not a string"),
        ];
        for (body, what) in cases {
            let (status, answer) = post_pipeline(NS, body).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {answer}");
            assert!(answer["error"].is_string() && answer["message"].is_string(), "{what}: {answer}");
            still_serving().await;
        }
        Ok(())
    });
}

#[test]
fn body_over_the_limit_is_413() {
    run_sim(
        |config| config.max_body_size = 64 * 1024,
        async {
            let big = json!({"requests": [execute(&format!("SELECT '{}'", "x".repeat(100 * 1024)))]}).to_string();
            let (status, answer) = post_pipeline(NS, big).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{answer}");
            assert!(answer["error"].is_string());
            still_serving().await;
            Ok(())
        },
    );
}

#[test]
fn unknown_baton_and_unknown_namespace_are_4xx() {
    run_sim(|_| {}, async {
        let (status, answer) = post_pipeline(NS, json!({"baton": "no-such-baton", "requests": [execute("SELECT 1")]}).to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(answer["code"], "STREAM_UNKNOWN");

        let (status, answer) = post_pipeline(&[("x-namespace", "ghost")], json!({"requests": []}).to_string()).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(answer["error"].as_str().unwrap().contains("ghost"));

        let (status, _) = post_pipeline(&[("x-namespace", "../../etc")], json!({"requests": []}).to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);

        // A baton only works for the namespace its stream belongs to.
        admin(Method::POST, "/v1/namespaces/other/create", "").await;
        let (_, open) = pipeline("default", json!({"requests": [execute("SELECT 1")]})).await;
        let baton = open["baton"].as_str().unwrap();
        let (status, answer) = post_pipeline(&[("x-namespace", "other")], json!({"baton": baton, "requests": []}).to_string()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

        let (status, answer) = call("primary", USER_PORT, Method::GET, "/no/such/route", &[], "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(json(&answer)["error"].is_string());
        still_serving().await;
        Ok(())
    });
}

#[test]
fn sql_errors_are_hrana_errors_with_sqlite_codes_not_http_errors() {
    run_sim(|_| {}, async {
        let (status, answer) = pipeline("default", json!({"requests": [
            execute("CREATE TABLE t (x PRIMARY KEY)"),
            execute("INSERT INTO t VALUES (1)"),
            execute("INSERT INTO t VALUES (1)"),
            execute("SELEKT"),
            {"type": "execute", "stmt": {"sql": "SELECT ?", "args": [{"type": "null"}, {"type": "null"}]}},
            {"type": "execute", "stmt": {"sql": "SELECT :a", "named_args": [{"name": "b", "value": {"type": "null"}}]}},
            execute("ATTACH 'elsewhere.db' AS other"),
            execute("PRAGMA journal_mode = DELETE"),
            execute("PRAGMA synchronous = OFF"),
            execute("PRAGMA journal_mode"),
            execute("VACUUM INTO 'copy.db'"),
            execute("VACUUM"),
            close()
        ]}))
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(error_code(&answer, 2), "SQLITE_CONSTRAINT");
        assert_eq!(error_code(&answer, 3), "SQLITE_ERROR");
        assert_eq!(error_code(&answer, 4), "ARGS_INVALID");
        assert_eq!(error_code(&answer, 5), "ARGS_INVALID");
        // What would take writes out of the replication log or reach other files is refused.
        assert_eq!(error_code(&answer, 6), "SQLITE_AUTH");
        assert_eq!(error_code(&answer, 7), "SQLITE_AUTH");
        assert_eq!(error_code(&answer, 8), "SQLITE_AUTH");
        assert_eq!(rows(&answer, 9), vec![json!([{"type": "text", "value": "wal"}])], "reading a guarded pragma is fine");
        assert_eq!(error_code(&answer, 10), "SQLITE_AUTH", "VACUUM INTO writes a file anywhere");
        assert_eq!(answer["results"][11]["type"], "ok", "a plain VACUUM works");
        Ok(())
    });
}
