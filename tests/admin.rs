//! The admin API under turmoil: namespace lifecycle, configuration, auth, metrics.

use hyper::{Method, StatusCode};
use serde_json::json;

use crate::common::*;

#[test]
fn namespace_create_conflict_delete_and_missing() {
    run_sim(|_| {}, async {
        let (status, _) = admin(Method::POST, "/v1/namespaces/tenant1/create", "").await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = admin(Method::POST, "/v1/namespaces/tenant1/create", "{}").await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert!(body["error"].as_str().unwrap().contains("already exists"), "{body}");

        let (_, list) = admin(Method::GET, "/v1/namespaces", "").await;
        assert_eq!(list["namespaces"], json!(["default", "tenant1"]));

        // The namespace serves queries once created.
        let (status, answer) = pipeline("tenant1", json!({"requests": [execute("SELECT 40 + 2"), close()]})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(rows(&answer, 0), vec![json!([{"type": "integer", "value": "42"}])]);

        let (status, _) = admin(Method::DELETE, "/v1/namespaces/tenant1", "").await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = admin(Method::DELETE, "/v1/namespaces/tenant1", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].is_string());
        let (status, _) = pipeline("tenant1", json!({"requests": [execute("SELECT 1")]})).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (_, list) = admin(Method::GET, "/v1/namespaces", "").await;
        assert_eq!(list["namespaces"], json!(["default"]));

        // A deleted namespace can be created again, empty.
        assert_eq!(admin(Method::POST, "/v1/namespaces/tenant1/create", "").await.0, StatusCode::OK);
        Ok(())
    });
}

#[test]
fn bad_namespace_names_are_rejected_without_touching_the_disk() {
    let mut sim = sim();
    let dir = start_server(&mut sim, "primary", |_| {});
    sim.client("client", async {
        for name in ["..%2Fetc", "a%20b", "a.b", &"x".repeat(300), "%C3%A9"] {
            let (status, body) = admin(Method::POST, &format!("/v1/namespaces/{name}/create"), "").await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{name}: {body}");
            assert!(body["error"].is_string());
        }
        let (status, _) = admin(Method::POST, "/v1/namespaces/ok-name_1/create", "{\"max_db_size\": \"10MB\", \"allow_attach\": true}").await;
        assert_eq!(status, StatusCode::OK);
        let (status, body) = admin(Method::POST, "/v1/namespaces/other/create", "{\"max_db_size\": [1]}").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        Ok(())
    });
    sim.run().unwrap();
    let mut entries: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    entries.sort();
    assert_eq!(entries, [".version", "dbs", "metastore"]);
    let mut dbs: Vec<String> = std::fs::read_dir(dir.path().join("dbs")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    dbs.sort();
    assert_eq!(dbs, ["default", "ok-name_1"]);
}

#[test]
fn block_writes_refuses_writes_but_serves_reads_until_lifted() {
    run_sim(|_| {}, async {
        pipeline("default", json!({"requests": [execute("CREATE TABLE t (x)"), execute("INSERT INTO t VALUES (1)"), close()]})).await;
        let (status, config) =
            admin(Method::POST, "/v1/namespaces/default/config", r#"{"block_writes": true, "block_reason": "migration"}"#).await;
        assert_eq!(status, StatusCode::OK, "{config}");
        assert_eq!(config["block_writes"], true);
        assert_eq!(admin(Method::GET, "/v1/namespaces/default/config", "").await.1["block_reason"], "migration");

        let (_, answer) = pipeline("default", json!({"requests": [execute("INSERT INTO t VALUES (2)"), execute("SELECT count(*) FROM t"), close()]})).await;
        assert_eq!(error_code(&answer, 0), "BLOCKED");
        assert!(answer["results"][0]["error"]["message"].as_str().unwrap().contains("migration"));
        assert_eq!(rows(&answer, 1), vec![json!([{"type": "integer", "value": "1"}])]);

        admin(Method::POST, "/v1/namespaces/default/config", r#"{"block_writes": false, "block_reads": true}"#).await;
        let (_, answer) = pipeline("default", json!({"requests": [execute("SELECT count(*) FROM t"), close()]})).await;
        assert_eq!(error_code(&answer, 0), "BLOCKED");

        admin(Method::POST, "/v1/namespaces/default/config", r#"{"block_reads": false}"#).await;
        let (_, answer) = pipeline("default", json!({"requests": [execute("INSERT INTO t VALUES (2)"), execute("SELECT count(*) FROM t"), close()]})).await;
        assert_eq!(rows(&answer, 1), vec![json!([{"type": "integer", "value": "2"}])]);

        let (status, _) = admin(Method::POST, "/v1/namespaces/default/config", r#"{"block_writes": "yes"}"#).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _) = admin(Method::GET, "/v1/namespaces/nope/config", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        Ok(())
    });
}

#[test]
fn admin_key_is_required_when_configured() {
    run_sim(
        |config| config.admin_auth_key = Some("s3cret".into()),
        async {
            let (status, body) = call("primary", ADMIN_PORT, Method::GET, "/v1/namespaces", &[], "").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert!(json(&body)["error"].is_string());
            let (status, _) = call("primary", ADMIN_PORT, Method::GET, "/v1/namespaces", &[("authorization", "Bearer wrong")], "").await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            let (status, _) = call("primary", ADMIN_PORT, Method::GET, "/v1/namespaces", &[("authorization", "Bearer s3cret")], "").await;
            assert_eq!(status, StatusCode::OK);
            Ok(())
        },
    );
}

#[test]
fn stats_checkpoint_and_metrics() {
    run_sim(|_| {}, async {
        pipeline("default", json!({"requests": [execute("CREATE TABLE t (x)"), execute("INSERT INTO t VALUES (randomblob(100000))"), close()]})).await;
        let (status, stats) = admin(Method::GET, "/v1/namespaces/default/stats", "").await;
        assert_eq!(status, StatusCode::OK);
        assert!(stats["wal_file_bytes"].as_u64().unwrap() > 100_000, "{stats}");
        let log = &stats["replication"];
        assert_eq!(log["log_id"].as_str().unwrap().len(), 36, "{stats}");
        let frames = log["frame_count"].as_u64().unwrap();
        assert!(frames > 100_000 / 4096, "the blob's pages are in the log: {stats}");
        assert_eq!(log["last_frame_no"], frames - 1);
        assert_eq!(log["wallog_bytes"], 64 + frames * 4120);
        assert_eq!(log["snapshot_count"], 0);

        let (status, _) = admin(Method::POST, "/v1/namespaces/default/checkpoint", "").await;
        assert_eq!(status, StatusCode::OK);
        let (_, stats) = admin(Method::GET, "/v1/namespaces/default/stats", "").await;
        assert_eq!(stats["wal_file_bytes"], 0, "{stats}");
        assert!(stats["data_file_bytes"].as_u64().unwrap() > 100_000, "{stats}");

        let (status, body) = call("primary", ADMIN_PORT, Method::GET, "/metrics", &[], "").await;
        assert_eq!(status, StatusCode::OK);
        let text = String::from_utf8(body).unwrap();
        assert!(text.contains(r#"sqld_http_requests_total{api="user",method="POST",route="/v2/pipeline",status="200"} 1"#), "{text}");
        assert!(text.contains(r#"sqld_http_request_duration_seconds_count{api="admin",method="GET",route="/v1/namespaces/:ns/stats",status="200"} 2"#));

        let (status, body) = admin(Method::GET, "/no/such/route", "").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].is_string());
        Ok(())
    });
}

async fn loaded_namespaces() -> u64 {
    let (_, body) = call("primary", ADMIN_PORT, Method::GET, "/metrics", &[], "").await;
    let text = String::from_utf8(body).unwrap();
    let line = text.lines().find(|l| l.starts_with("sqld_namespaces_loaded ")).expect("gauge present");
    line.split(' ').nth(1).unwrap().parse::<f64>().unwrap() as u64
}

#[test]
fn least_recently_used_namespaces_are_closed_past_the_limit_and_reopen_on_use() {
    run_sim(
        |config| config.max_active_namespaces = 2,
        async {
            for ns in ["a", "b", "c", "d"] {
                assert_eq!(admin(Method::POST, &format!("/v1/namespaces/{ns}/create"), "").await.0, StatusCode::OK);
                pipeline(ns, json!({"requests": [execute("CREATE TABLE t (name)"), execute(&format!("INSERT INTO t VALUES ('{ns}')")), close()]})).await;
                assert!(loaded_namespaces().await <= 2, "more namespaces open than the limit");
            }
            // Every namespace, closed or not, still answers with its own data.
            for ns in ["a", "b", "c", "d", "a"] {
                let (_, answer) = pipeline(ns, json!({"requests": [execute("SELECT name FROM t"), close()]})).await;
                assert_eq!(rows(&answer, 0), vec![json!([{"type": "text", "value": ns}])]);
                assert!(loaded_namespaces().await <= 2);
            }
            Ok(())
        },
    );
}

#[test]
fn a_namespace_in_use_is_not_closed_under_it() {
    run_sim(
        |config| config.max_active_namespaces = 1,
        async {
            admin(Method::POST, "/v1/namespaces/busy/create", "").await;
            admin(Method::POST, "/v1/namespaces/other/create", "").await;
            // An open transaction on `busy` holds the namespace.
            let (_, open) = pipeline("busy", json!({"requests": [execute("CREATE TABLE t (x)"), execute("BEGIN"), execute("INSERT INTO t VALUES (1)")]})).await;
            let baton = open["baton"].as_str().unwrap().to_owned();
            pipeline("other", json!({"requests": [execute("SELECT 1"), close()]})).await;
            assert_eq!(loaded_namespaces().await, 2, "the busy namespace stays open past the limit");
            let (_, done) = pipeline("busy", json!({"baton": baton, "requests": [execute("COMMIT"), execute("SELECT count(*) FROM t"), close()]})).await;
            assert_eq!(rows(&done, 1), vec![json!([{"type": "integer", "value": "1"}])]);
            Ok(())
        },
    );
}
