//! Hostile HTTP clients: bodies that never arrive or are too large, slow and idle connections,
//! too many connections, requests and streams. Each gets a bounded, clear answer (or its
//! connection closed), is counted in `/metrics`, and the server goes on serving.

use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

/// Opens a raw connection to the user port and writes `bytes`.
async fn raw(bytes: &[u8]) -> turmoil::net::TcpStream {
    let mut stream = turmoil::net::TcpStream::connect(("primary", USER_PORT)).await.expect("connect");
    stream.write_all(bytes).await.unwrap();
    stream
}

/// Reads until the server closes the connection (bounded by simulated time): the status
/// line's code and the body after the head, or `None` if it closed without an answer.
async fn answer_then_close(stream: &mut turmoil::net::TcpStream) -> Option<(u16, serde_json::Value)> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut out)).await.expect("the server closed the connection").ok()?;
    if out.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).unwrap().parse().unwrap();
    let (_, body) = text.split_once("\r\n\r\n").unwrap();
    Some((status, json(body.as_bytes())))
}

/// A whole HTTP/1.1 request: a pipeline running `SELECT 1` on `default`.
fn select_one_request() -> String {
    let body = json!({"requests": [execute("SELECT 1"), close()]}).to_string();
    format!("POST /v2/pipeline HTTP/1.1\r\nhost: primary\r\nx-namespace: default\r\ncontent-length: {}\r\n\r\n{body}", body.len())
}

/// The start of a request whose head never ends (slowloris).
const HEAD_THAT_NEVER_ENDS: &[u8] = b"POST /v2/pipeline HTTP/1.1\r\nhost: primary\r\nx-slow: 1";

async fn still_serving() {
    let (status, answer) = pipeline("default", json!({"requests": [execute("SELECT 1"), close()]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

async fn limit_hits(limit: &str) -> u64 {
    let (_, body) = call("primary", ADMIN_PORT, Method::GET, "/metrics", &[], "").await;
    let text = String::from_utf8(body).unwrap();
    let line = format!("sqld_limit_hits_total{{limit=\"{limit}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&line)).unwrap_or_else(|| panic!("no {line} in {text}")).parse().unwrap()
}

#[test]
fn a_declared_body_over_the_limit_is_refused_before_it_is_sent() {
    run_sim(|_| {}, async {
        let mut stream = raw(b"POST /v2/pipeline HTTP/1.1\r\nhost: primary\r\ncontent-length: 100000000\r\n\r\n").await;
        let (status, body) = answer_then_close(&mut stream).await.expect("an answer");
        assert_eq!(status, 413, "{body}");
        assert_eq!(body["code"], "BODY_TOO_LARGE");
        assert_eq!(limit_hits("max_body_size").await, 1);
        still_serving().await;
        Ok(())
    });
}

#[test]
fn a_body_that_never_arrives_times_out_with_408() {
    run_sim(|config| config.body_read_timeout_s = 5, async {
        for head in [
            &b"POST /v2/pipeline HTTP/1.1\r\nhost: primary\r\ncontent-length: 100\r\n\r\n{\"requests\":"[..],
            b"POST /v2/pipeline HTTP/1.1\r\nhost: primary\r\ntransfer-encoding: chunked\r\n\r\n10\r\n{\"requests\":",
        ] {
            let mut stream = raw(head).await;
            let (status, body) = answer_then_close(&mut stream).await.expect("an answer");
            assert_eq!(status, 408, "{body}");
            assert_eq!(body["code"], "BODY_TIMEOUT");
        }
        assert_eq!(limit_hits("body_read_timeout").await, 2);
        still_serving().await;
        Ok(())
    });
}

#[test]
fn a_malformed_chunk_size_is_a_4xx() {
    run_sim(|_| {}, async {
        let mut stream =
            raw(b"POST /v2/pipeline HTTP/1.1\r\nhost: primary\r\ntransfer-encoding: chunked\r\n\r\nffffffffffffffff\r\nabc").await;
        if let Some((status, body)) = answer_then_close(&mut stream).await {
            assert!((400..500).contains(&status), "{status} {body}");
        }
        still_serving().await;
        Ok(())
    });
}

#[test]
fn slow_headers_and_idle_keep_alive_connections_are_closed() {
    run_sim(
        |config| {
            config.header_read_timeout_s = 3;
            config.idle_connection_timeout_s = 5;
        },
        async {
            // A head that never ends (slowloris): closed without an answer.
            let mut slow = raw(HEAD_THAT_NEVER_ENDS).await;
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(60), slow.read_to_end(&mut rest)).await.expect("closed");
            assert!(read.is_err() || rest.is_empty() || String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 408"), "{rest:?}");

            // A complete request, then silence: the server closes the idle connection.
            let request = select_one_request();
            let mut idle = raw(request.as_bytes()).await;
            let mut answer = vec![0u8; 4096];
            let n = idle.read(&mut answer).await.unwrap();
            assert!(
                String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"),
                "the request itself was answered: {}",
                String::from_utf8_lossy(&answer[..n])
            );
            let mut rest = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(60), idle.read_to_end(&mut rest)).await;
            assert!(read.is_ok(), "the idle connection was closed: {read:?} {rest:?}");
            still_serving().await;
            Ok(())
        },
    );
}

/// An idle keep-alive connection lives for the idle timeout, not the header-read timeout (a
/// client reusing it after a few seconds got "other side closed", which the Hrana client
/// reports as "Client was closed"), and every answer says how long it may be reused; a head
/// is timed from its first byte, however long the connection was idle before it.
#[test]
fn idle_keep_alive_connections_last_the_idle_timeout_and_say_so() {
    run_sim(
        |config| {
            config.header_read_timeout_s = 2;
            config.idle_connection_timeout_s = 12;
        },
        async {
            let request = select_one_request();
            let mut conn = raw(request.as_bytes()).await;
            let mut answer = vec![0u8; 4096];
            for round in 0..2 {
                let n = conn.read(&mut answer).await.unwrap();
                let text = String::from_utf8_lossy(&answer[..n]).to_lowercase();
                assert!(text.starts_with("http/1.1 200"), "round {round}: {text}");
                assert!(text.contains("\r\nkeep-alive: timeout=11\r\n"), "round {round}: {text}");
                // Idle for three header-read timeouts, well within the idle timeout.
                tokio::time::sleep(Duration::from_secs(6)).await;
                // The next request's head arrives in two parts, a second apart: within its limit.
                let (head, rest) = request.split_at(20);
                conn.write_all(head.as_bytes()).await.unwrap();
                tokio::time::sleep(Duration::from_secs(1)).await;
                conn.write_all(rest.as_bytes()).await.unwrap();
            }
            let n = conn.read(&mut answer).await.unwrap();
            assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"), "the third request on the connection");

            // A head that never ends is closed by the head's own limit, well before the idle
            // timeout would close the connection.
            let mut slow = raw(HEAD_THAT_NEVER_ENDS).await;
            let mut rest = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(8), slow.read_to_end(&mut rest)).await;
            assert!(closed.is_ok(), "a slow head was closed within 8 s (idle timeout 12 s)");
            Ok(())
        },
    );
}

#[test]
fn connections_over_the_limit_get_503_and_the_others_are_served() {
    run_sim(
        |config| {
            config.max_concurrent_connections = 2;
            config.header_read_timeout_s = 30;
        },
        async {
            let _a = raw(b"").await;
            let _b = raw(b"").await;
            let mut third = raw(b"GET /health HTTP/1.1\r\nhost: primary\r\n\r\n").await;
            let (status, body) = answer_then_close(&mut third).await.expect("an answer");
            assert_eq!(status, 503, "{body}");
            assert_eq!(body["code"], "CONNECTIONS_EXHAUSTED");
            drop((_a, _b));
            let mut served = false;
            for _ in 0..100 {
                // Until the server has seen them close, a new connection is still refused
                // (and may be closed before its request is read).
                let answer = try_call("primary", USER_PORT, Method::GET, "/health", &[], "").await;
                if answer.is_ok_and(|(status, _)| status == StatusCode::OK) {
                    served = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert!(served, "closing connections frees their places");
            assert!(limit_hits("max_concurrent_connections").await >= 1);
            Ok(())
        },
    );
}

#[test]
fn method_not_allowed_is_a_json_error() {
    run_sim(|_| {}, async {
        let (status, body) = call("primary", USER_PORT, Method::GET, "/v2/pipeline", &[], "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(json(&body)["code"], "METHOD_NOT_ALLOWED");
        let (status, body) = call("primary", ADMIN_PORT, Method::PUT, "/v1/namespaces", &[], "").await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
        assert!(json(&body)["error"].is_string());
        Ok(())
    });
}

#[test]
fn streams_are_bounded_per_namespace_and_per_server_and_freed_when_they_end() {
    run_sim(
        |config| {
            config.max_streams = 5;
            config.max_streams_per_namespace = 3;
            config.max_active_namespaces = 2;
        },
        async {
            for ns in ["a", "b", "c", "d"] {
                admin(Method::POST, &format!("/v1/namespaces/{ns}/create"), "").await;
            }
            let open = |ns: &'static str| async move { pipeline(ns, json!({"requests": [execute("SELECT 1")]})).await };
            for _ in 0..3 {
                assert_eq!(open("a").await.0, StatusCode::OK);
            }
            let (status, answer) = open("a").await;
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
            assert_eq!(answer["code"], "STREAMS_EXHAUSTED");
            assert_eq!(open("b").await.0, StatusCode::OK);
            assert_eq!(open("c").await.0, StatusCode::OK);
            let (status, answer) = open("d").await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{answer}");
            // A pipeline that closes its stream needs no place.
            let (status, _) = pipeline("d", json!({"requests": [execute("SELECT 1"), close()]})).await;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(limit_hits("max_streams_per_namespace").await, 1);
            assert_eq!(limit_hits("max_streams").await, 1);

            // Idle streams expire (10 s); their places and namespaces are freed.
            tokio::time::sleep(Duration::from_secs(15)).await;
            let (_, metrics) = call("primary", ADMIN_PORT, Method::GET, "/metrics", &[], "").await;
            let metrics = String::from_utf8(metrics).unwrap();
            assert!(metrics.contains("sqld_hrana_streams_parked 0\n"), "{metrics}");
            let loaded: f64 = metrics.lines().find_map(|l| l.strip_prefix("sqld_namespaces_loaded ")).unwrap().parse().unwrap();
            assert!(loaded <= 2.0, "{loaded} namespaces stay loaded past --max-active-namespaces 2");
            for _ in 0..3 {
                assert_eq!(open("a").await.0, StatusCode::OK);
            }
            Ok(())
        },
    );
}

#[test]
fn writes_over_the_namespace_quota_are_a_client_error_and_others_go_on() {
    run_sim(|_| {}, async {
        let (status, _) = admin(Method::POST, "/v1/namespaces/small/create", r#"{"max_db_size": "64kb"}"#).await;
        assert_eq!(status, StatusCode::OK);
        admin(Method::POST, "/v1/namespaces/other/create", "").await;
        let v1 = |sql: &str| {
            let body = json!({"stmt": {"sql": sql}}).to_string();
            async move {
                let (status, body) = call("primary", USER_PORT, Method::POST, "/v1/execute", &[("x-namespace", "small")], body).await;
                (status, json(&body))
            }
        };
        assert_eq!(v1("CREATE TABLE t (v)").await.0, StatusCode::OK);
        let (status, answer) = v1("INSERT INTO t SELECT randomblob(1000) FROM generate_series(1, 200)").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
        assert_eq!(answer["code"], "SQLITE_FULL");
        let (_, answer) =
            pipeline("small", json!({"requests": [execute("INSERT INTO t SELECT randomblob(1000) FROM generate_series(1, 200)"), close()]}))
                .await;
        assert_eq!(error_code(&answer, 0), "SQLITE_FULL");
        assert_eq!(limit_hits("max_db_size").await, 2);
        // Small writes still fit; the other namespace never noticed.
        assert_eq!(v1("INSERT INTO t VALUES (1)").await.0, StatusCode::OK);
        let (_, answer) = pipeline("other", json!({"requests": [execute("CREATE TABLE t (v)"), close()]})).await;
        assert_eq!(answer["results"][0]["type"], "ok");
        Ok(())
    });
}

async fn v1_execute(sql: &str) -> (StatusCode, serde_json::Value) {
    let body = json!({"stmt": {"sql": sql}}).to_string();
    let (status, body) = call("primary", USER_PORT, Method::POST, "/v1/execute", &[("x-namespace", "default")], body).await;
    (status, json(&body))
}

const ROWS_OF_1K: &str = "SELECT randomblob(1000) FROM generate_series(1, ?)";

fn rows_of_1k(n: u32) -> String {
    ROWS_OF_1K.replace('?', &n.to_string())
}

#[test]
fn an_answer_over_the_response_limit_stops_with_a_clear_error() {
    run_sim(|config| config.max_response_size = 200_000, async {
        let (status, answer) = pipeline("default", json!({"requests": [execute(&rows_of_1k(5000)), execute("SELECT 1"), close()]})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(error_code(&answer, 0), "RESPONSE_TOO_LARGE");
        assert_eq!(answer["results"][1]["type"], "ok", "the stream goes on");
        let (status, answer) = v1_execute(&rows_of_1k(5000)).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some("RESPONSE_TOO_LARGE")), "{answer}");
        let (status, answer) = v1_execute(&rows_of_1k(100)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(limit_hits("max_response_size").await, 2);
        Ok(())
    });
}

#[test]
fn answers_in_flight_are_bounded_together_and_their_shares_given_back() {
    run_sim(|config| config.max_total_response_size = 300_000, async {
        let (status, answer) = v1_execute(&rows_of_1k(400)).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("RESPONSES_EXHAUSTED")), "{answer}");
        for _ in 0..5 {
            let (status, answer) = v1_execute(&rows_of_1k(100)).await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            assert_eq!(answer["result"]["rows"].as_array().unwrap().len(), 100);
        }
        assert_eq!(limit_hits("max_total_response_size").await, 1);
        Ok(())
    });
}

#[test]
fn a_write_whose_returned_rows_overflow_the_answer_is_rolled_back_with_them() {
    run_sim(|config| config.max_response_size = 200_000, async {
        let (_, answer) = pipeline("default", json!({"requests": [execute("CREATE TABLE t (v)"), close()]})).await;
        assert_eq!(answer["results"][0]["type"], "ok");
        let insert = "INSERT INTO t SELECT randomblob(1000) FROM generate_series(1, 5000) RETURNING v";
        let (status, answer) = v1_execute(insert).await;
        assert_eq!((status, answer["code"].as_str()), (StatusCode::BAD_REQUEST, Some("RESPONSE_TOO_LARGE")), "{answer}");
        // Inside a transaction too: the statement is undone, the transaction goes on.
        let (_, answer) = pipeline("default", json!({"requests": [
            execute("BEGIN"),
            execute("INSERT INTO t VALUES (1)"),
            execute(insert),
            execute("COMMIT"),
            execute("SELECT count(*) FROM t"),
            close()
        ]}))
        .await;
        assert_eq!(error_code(&answer, 2), "RESPONSE_TOO_LARGE");
        assert_eq!(answer["results"][3]["type"], "ok", "{answer}");
        assert_eq!(rows(&answer, 4), vec![json!([{"type": "integer", "value": "1"}])], "an error never hides a committed write");
        Ok(())
    });
}

#[test]
fn a_stream_refused_for_lack_of_room_runs_nothing() {
    run_sim(|config| config.max_streams_per_namespace = 1, async {
        let (_, answer) = pipeline("default", json!({"requests": [execute("CREATE TABLE t (v)"), close()]})).await;
        assert_eq!(answer["results"][0]["type"], "ok");
        let (status, _) = pipeline("default", json!({"requests": [execute("SELECT 1")]})).await;
        assert_eq!(status, StatusCode::OK, "the one place is taken");
        let (status, answer) = pipeline("default", json!({"requests": [execute("INSERT INTO t VALUES (1)")]})).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{answer}");
        let (_, answer) = pipeline("default", json!({"requests": [execute("SELECT count(*) FROM t"), close()]})).await;
        assert_eq!(rows(&answer, 0), vec![json!([{"type": "integer", "value": "0"}])], "the refused request wrote nothing");
        Ok(())
    });
}

#[test]
fn streams_opened_over_one_connection_are_bounded() {
    run_sim(|config| config.max_streams_per_connection = 2, async {
        let stream = turmoil::net::TcpStream::connect(("primary", USER_PORT)).await.expect("connect");
        let (mut one_connection, conn) = hyper::client::conn::handshake(stream).await.expect("handshake");
        tokio::spawn(conn);
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let request = hyper::Request::post("/v2/pipeline")
                .header("host", "primary")
                .header("x-namespace", "default")
                .body(hyper::Body::from(json!({"requests": [execute("SELECT 1")]}).to_string()))
                .unwrap();
            let response = one_connection.send_request(request).await.expect("request");
            statuses.push(response.status());
            hyper::body::to_bytes(response.into_body()).await.unwrap();
        }
        assert_eq!(statuses, [StatusCode::OK, StatusCode::OK, StatusCode::TOO_MANY_REQUESTS]);
        // Another connection has its own bound.
        let (status, _) = pipeline("default", json!({"requests": [execute("SELECT 1")]})).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(limit_hits("max_streams_per_connection").await, 1);
        Ok(())
    });
}

#[test]
fn a_returning_write_whose_commit_fails_reports_the_failure() {
    run_sim(|_| {}, async {
        let (_, answer) = pipeline("default", json!({"requests": [
            execute("PRAGMA foreign_keys = ON"),
            execute("CREATE TABLE p (id INTEGER PRIMARY KEY)"),
            execute("CREATE TABLE c (pid REFERENCES p (id) DEFERRABLE INITIALLY DEFERRED)"),
            execute("INSERT INTO c VALUES (42) RETURNING pid"),
            {"type": "get_autocommit"},
            execute("SELECT count(*) FROM c"),
            close()
        ]}))
        .await;
        for i in 0..3 {
            assert_eq!(answer["results"][i]["type"], "ok", "{answer}");
        }
        assert_eq!(error_code(&answer, 3), "SQLITE_CONSTRAINT", "the deferred check fails at commit: {answer}");
        assert_eq!(answer["results"][4]["response"]["is_autocommit"], true, "no transaction is left open: {answer}");
        assert_eq!(rows(&answer, 5), vec![json!([{"type": "integer", "value": "0"}])]);
        Ok(())
    });
}

#[test]
fn a_configuration_change_leaves_open_transactions_working() {
    run_sim(|_| {}, async {
        let (_, answer) = pipeline("default", json!({"requests": [execute("CREATE TABLE t (v)"), close()]})).await;
        assert_eq!(answer["results"][0]["type"], "ok");
        let (_, open) = pipeline("default", json!({"requests": [execute("BEGIN"), execute("INSERT INTO t VALUES (1)")]})).await;
        assert_eq!(open["results"][1]["type"], "ok", "{open}");
        let (status, _) = admin(Method::POST, "/v1/namespaces/default/config", r#"{"max_db_size": "100MB"}"#).await;
        assert_eq!(status, StatusCode::OK);
        let (_, answer) = pipeline("default", json!({"baton": open["baton"], "requests": [
            execute("INSERT INTO t VALUES (2)"),
            execute("COMMIT"),
            execute("SELECT count(*) FROM t"),
            close()
        ]}))
        .await;
        assert_eq!(answer["results"][1]["type"], "ok", "{answer}");
        assert_eq!(rows(&answer, 2), vec![json!([{"type": "integer", "value": "2"}])]);
        Ok(())
    });
}

#[test]
fn a_small_body_that_would_decode_into_a_huge_request_is_refused_before_decoding() {
    run_sim(
        |config| config.max_request_values = 10_000,
        async {
            // JSON: 20,001 values in 200 KB.
            let requests = vec![json!({"type": "close"}); 10_000];
            let (status, body) = pipeline("default", json!({ "requests": requests })).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
            assert_eq!(body["code"], "BODY_TOO_MANY_VALUES");
            // Protobuf: 10,001 empty requests in 20 KB (2 bytes each, 104 bytes decoded).
            let empties: Vec<u8> = std::iter::repeat([0x12u8, 0x00]).take(10_001).flatten().collect();
            let (status, body) = call("primary", USER_PORT, Method::POST, "/v3-protobuf/pipeline", &[], empties).await;
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{}", String::from_utf8_lossy(&body));
            assert_eq!(json(&body)["code"], "BODY_TOO_MANY_VALUES");
            assert_eq!(limit_hits("max_request_values").await, 2);
            // Under the bound, a large batch is served.
            let steps: Vec<_> = (0..3_000).map(|_| json!({"stmt": {"sql": "SELECT 1"}})).collect();
            let (status, body) = pipeline("default", json!({"requests": [{"type": "batch", "batch": {"steps": steps}}, close()]})).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["results"][0]["response"]["result"]["step_results"].as_array().unwrap().len(), 3_000);
            still_serving().await;
            Ok(())
        },
    );
}
