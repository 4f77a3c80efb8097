//! Hrana over WebSocket under turmoil: subprotocol choice, every request type, stored SQL and
//! cursors, the protocol's errors (a socket closed only where Hrana says so), the bounds, a
//! client that vanishes inside a transaction, and the `hello` that authenticates.

use futures::{SinkExt, StreamExt};
use hyper::{Method, StatusCode};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::tokens::Signer;
use crate::common::*;

type Socket = WebSocketStream<turmoil::net::TcpStream>;

/// What the helpers below run on: a socket over turmoil's network or a real one.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Io for T {}

/// A socket to the server offering `protocols`; the subprotocol it chose.
async fn connect(protocols: &str) -> (Socket, Option<String>) {
    let stream = turmoil::net::TcpStream::connect(("primary", USER_PORT)).await.unwrap();
    let mut request = "ws://primary:8080/".into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", protocols.parse().unwrap());
    request.headers_mut().insert("x-namespace", "default".parse().unwrap());
    let (socket, response) = tokio_tungstenite::client_async(request, stream).await.unwrap();
    let chosen = response.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap().to_owned());
    (socket, chosen)
}

async fn send(socket: &mut WebSocketStream<impl Io>, message: Value) {
    socket.send(Message::Text(message.to_string())).await.unwrap();
}

/// The next message: its JSON, or how the socket ended (a close frame's code, or none).
async fn next(socket: &mut WebSocketStream<impl Io>) -> Result<Value, Option<u16>> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text).unwrap()),
            Some(Ok(Message::Close(frame))) => return Err(frame.map(|f| f.code.into())),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return Err(None),
        }
    }
}

async fn hello(socket: &mut WebSocketStream<impl Io>, jwt: Option<&str>) -> Value {
    send(socket, json!({"type": "hello", "jwt": jwt})).await;
    next(socket).await.unwrap()
}

/// One request; its response (`response_ok`'s response or `response_error`'s error, tagged).
async fn request(socket: &mut WebSocketStream<impl Io>, id: i32, request: Value) -> Result<Value, Value> {
    send(socket, json!({"type": "request", "request_id": id, "request": request})).await;
    let answer = next(socket).await.unwrap_or_else(|code| panic!("the socket closed ({code:?}) on {request}"));
    assert_eq!(answer["request_id"], id, "{answer}");
    match answer["type"].as_str() {
        Some("response_ok") => Ok(answer["response"].clone()),
        Some("response_error") => Err(answer["error"].clone()),
        _ => panic!("not a response: {answer}"),
    }
}

fn stmt(sql: &str) -> Value {
    json!({"sql": sql, "want_rows": true})
}

/// Whether `/metrics` has the line `line`.
async fn ws_metric(line: &str) -> bool {
    let (_, metrics) = call("primary", ADMIN_PORT, Method::GET, "/metrics", &[], "").await;
    String::from_utf8(metrics).unwrap().lines().any(|l| l == line)
}

/// The HTTP side still serves: the server goes on after whatever a socket did.
async fn still_serving() {
    let (status, answer) = pipeline("default", json!({"requests": [execute("SELECT 1"), close()]})).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
}

#[test]
fn the_best_offered_subprotocol_and_every_request_type() {
    run_sim(|_| {}, async {
        let (_, chosen) = connect("hrana1, hrana2, hrana3").await;
        assert_eq!(chosen.as_deref(), Some("hrana3"));
        let (_, chosen) = connect("hrana3-protobuf, hrana3, hrana2, hrana1").await;
        assert_eq!(chosen.as_deref(), Some("hrana3-protobuf"));
        let (_, chosen) = connect("hrana2,hrana1").await;
        assert_eq!(chosen.as_deref(), Some("hrana2"));

        let (mut ws, _) = connect("hrana3").await;
        assert_eq!(hello(&mut ws, None).await["type"], "hello_ok");
        request(&mut ws, 1, json!({"type": "open_stream", "stream_id": 7})).await.unwrap();
        let created = request(&mut ws, 2, json!({"type": "execute", "stream_id": 7, "stmt": stmt("CREATE TABLE t (x)")})).await.unwrap();
        assert_eq!(created["type"], "execute");
        // Stored SQL belongs to the socket: stored once, used by id on any stream.
        request(&mut ws, 3, json!({"type": "store_sql", "sql_id": 1, "sql": "INSERT INTO t VALUES (?)"})).await.unwrap();
        let inserted = request(&mut ws, 4, json!({"type": "execute", "stream_id": 7, "stmt": {"sql_id": 1, "args": [{"type": "integer", "value": "9007199254740993"}], "want_rows": false}})).await.unwrap();
        assert_eq!(inserted["result"]["affected_row_count"], 1, "{inserted}");
        let batch = json!({"steps": [
            {"stmt": {"sql_id": 1, "args": [{"type": "integer", "value": "2"}]}},
            {"condition": {"type": "ok", "step": 0}, "stmt": stmt("SELECT x FROM t ORDER BY x")},
        ]});
        let batched = request(&mut ws, 5, json!({"type": "batch", "stream_id": 7, "batch": batch})).await.unwrap();
        assert_eq!(batched["result"]["step_results"][1]["rows"][1][0]["value"], "9007199254740993", "{batched}");
        request(&mut ws, 6, json!({"type": "sequence", "stream_id": 7, "sql": "BEGIN; INSERT INTO t VALUES (3)"})).await.unwrap();
        let autocommit = request(&mut ws, 7, json!({"type": "get_autocommit", "stream_id": 7})).await.unwrap();
        assert_eq!(autocommit["is_autocommit"], false);
        request(&mut ws, 8, json!({"type": "execute", "stream_id": 7, "stmt": stmt("ROLLBACK")})).await.unwrap();
        let described = request(&mut ws, 9, json!({"type": "describe", "stream_id": 7, "sql": "SELECT x AS one FROM t"})).await.unwrap();
        assert_eq!(described["result"]["cols"][0]["name"], "one", "{described}");

        // A cursor: its entries a few at a time.
        let cursor_batch = json!({"steps": [{"stmt": stmt("SELECT x FROM t ORDER BY x")}]});
        request(&mut ws, 10, json!({"type": "open_cursor", "stream_id": 7, "cursor_id": 3, "batch": cursor_batch})).await.unwrap();
        let first = request(&mut ws, 11, json!({"type": "fetch_cursor", "cursor_id": 3, "max_count": 2})).await.unwrap();
        assert_eq!(first["entries"].as_array().unwrap().len(), 2, "{first}");
        assert_eq!(first["entries"][0]["type"], "step_begin");
        assert_eq!(first["done"], false);
        let rest = request(&mut ws, 12, json!({"type": "fetch_cursor", "cursor_id": 3, "max_count": 100})).await.unwrap();
        let types: Vec<&str> = rest["entries"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["row", "step_end"], "{rest}");
        assert_eq!(rest["done"], true);
        request(&mut ws, 13, json!({"type": "close_cursor", "cursor_id": 3})).await.unwrap();

        // Hrana 1 knows none of the later requests; the socket goes on.
        let (mut old, _) = connect("hrana1").await;
        hello(&mut old, None).await;
        request(&mut old, 1, json!({"type": "open_stream", "stream_id": 1})).await.unwrap();
        let refused = request(&mut old, 2, json!({"type": "sequence", "stream_id": 1, "sql": "SELECT 1"})).await.unwrap_err();
        assert_eq!(refused["code"], "PROTO_ERROR", "{refused}");
        let counted =
            request(&mut old, 3, json!({"type": "execute", "stream_id": 1, "stmt": stmt("SELECT count(*) FROM t")})).await.unwrap();
        assert_eq!(counted["result"]["rows"][0][0]["value"], "2");
        request(&mut ws, 14, json!({"type": "close_stream", "stream_id": 7})).await.unwrap();

        let (_, metrics) = call("primary", ADMIN_PORT, Method::GET, "/metrics", &[], "").await;
        let metrics = String::from_utf8(metrics).unwrap();
        assert!(metrics.contains("sqld_ws_requests_total{type=\"execute\"} 4"), "{metrics}");
        assert!(metrics.contains("sqld_ws_streams 1\n"), "one stream is still open (the Hrana 1 socket's): {metrics}");
        Ok(())
    });
}

#[test]
fn protocol_errors_close_the_socket_and_request_errors_do_not() {
    let limits = |config: &mut libsql_server::Config| {
        config.max_body_size = 64 * 1024;
        config.max_request_values = 1_000;
    };
    run_sim(limits, async {
        for (first, expected) in [
            (Message::Text("{not json".into()), Some(1002)),
            (
                Message::Text(json!({"type": "request", "request_id": 1, "request": {"type": "open_stream", "stream_id": 1}}).to_string()),
                Some(1002),
            ),
            (Message::Text(json!({"type": "goodbye"}).to_string()), Some(1002)),
            // A field of the wrong shape is refused as it is read, never built.
            (Message::Text(json!({"type": "hello", "jwt": [{"a": 0}, {"a": 0}]}).to_string()), Some(1002)),
            (Message::Binary(vec![1, 2, 3]), Some(1003)),
        ] {
            let (mut ws, _) = connect("hrana3").await;
            ws.send(first.clone()).await.unwrap();
            assert_eq!(next(&mut ws).await.unwrap_err(), expected, "after {first:?}");
        }
        // hrana3-protobuf speaks binary messages only, and refuses what does not decode.
        for (first, expected) in
            [(Message::Text(json!({"type": "hello"}).to_string()), Some(1003)), (Message::Binary(vec![0xff; 8]), Some(1002))]
        {
            let (mut ws, chosen) = connect("hrana3-protobuf").await;
            assert_eq!(chosen.as_deref(), Some("hrana3-protobuf"));
            ws.send(first.clone()).await.unwrap();
            assert_eq!(next(&mut ws).await.unwrap_err(), expected, "after {first:?}");
        }
        // Holding more values than a request may (a batch of 2,000 empty steps): closed.
        let (mut ws, _) = connect("hrana3").await;
        hello(&mut ws, None).await;
        let steps = vec![json!({"stmt": {}}); 2_000];
        let many = json!({"type": "request", "request_id": 1, "request": {"type": "batch", "stream_id": 1, "batch": {"steps": steps}}});
        ws.send(Message::Text(many.to_string())).await.unwrap();
        assert_eq!(next(&mut ws).await.unwrap_err(), Some(1002));
        // Larger than a request body may be: the socket is dropped.
        let (mut ws, _) = connect("hrana3").await;
        hello(&mut ws, None).await;
        let huge = json!({"type": "request", "request_id": 1, "request": {"type": "store_sql", "sql_id": 1, "sql": "x".repeat(100_000)}});
        let _ = ws.send(Message::Text(huge.to_string())).await;
        assert!(next(&mut ws).await.is_err(), "an oversized message was answered");

        // Mistakes inside a request are answered, and the socket goes on.
        let (mut ws, _) = connect("hrana3").await;
        hello(&mut ws, None).await;
        for (i, bad) in [
            json!({"type": "execute", "stream_id": 9, "stmt": stmt("SELECT 1")}),
            json!({"type": "teleport", "stream_id": 9}),
            json!({"type": "open_stream"}),
            json!({"type": "fetch_cursor", "cursor_id": 4, "max_count": 1}),
        ]
        .into_iter()
        .enumerate()
        {
            let refused = request(&mut ws, i as i32, bad.clone()).await.unwrap_err();
            assert!(refused["code"].is_string() && refused["message"].is_string(), "{bad}: {refused}");
        }
        request(&mut ws, 10, json!({"type": "open_stream", "stream_id": 1})).await.unwrap();
        let refused = request(&mut ws, 11, json!({"type": "open_stream", "stream_id": 1})).await.unwrap_err();
        assert_eq!(refused["code"], "PROTO_ERROR");
        let sql_error = request(&mut ws, 12, json!({"type": "execute", "stream_id": 1, "stmt": stmt("SELEC 1")})).await.unwrap_err();
        assert_eq!(sql_error["code"], "SQLITE_ERROR", "{sql_error}");
        request(&mut ws, 13, json!({"type": "execute", "stream_id": 1, "stmt": stmt("SELECT 1")})).await.unwrap();
        still_serving().await;
        Ok(())
    });
}

#[test]
fn streams_per_socket_are_bounded() {
    run_sim(|config| config.max_streams_per_connection = 2, async {
        let (mut ws, _) = connect("hrana3").await;
        hello(&mut ws, None).await;
        request(&mut ws, 1, json!({"type": "open_stream", "stream_id": 1})).await.unwrap();
        request(&mut ws, 2, json!({"type": "open_stream", "stream_id": 2})).await.unwrap();
        let refused = request(&mut ws, 3, json!({"type": "open_stream", "stream_id": 3})).await.unwrap_err();
        assert_eq!(refused["code"], "STREAMS_EXHAUSTED", "{refused}");
        // Requests on the stream that failed to open fail too; closing it frees its id.
        let failed = request(&mut ws, 4, json!({"type": "execute", "stream_id": 3, "stmt": stmt("SELECT 1")})).await.unwrap_err();
        assert_eq!(failed["code"], "STREAM_NOT_FOUND");
        request(&mut ws, 5, json!({"type": "close_stream", "stream_id": 3})).await.unwrap();
        request(&mut ws, 6, json!({"type": "close_stream", "stream_id": 1})).await.unwrap();
        request(&mut ws, 7, json!({"type": "open_stream", "stream_id": 3})).await.unwrap();
        request(&mut ws, 8, json!({"type": "execute", "stream_id": 3, "stmt": stmt("SELECT 1")})).await.unwrap();
        // Ids refused a stream hold nothing: any number of them leaves the socket serving.
        for id in 10..50 {
            request(&mut ws, id, json!({"type": "open_stream", "stream_id": id})).await.unwrap_err();
        }
        request(&mut ws, 60, json!({"type": "execute", "stream_id": 3, "stmt": stmt("SELECT 1")})).await.unwrap();

        // Stored SQL is bounded in bytes as well as in count.
        let (mut ws, _) = connect("hrana3").await;
        hello(&mut ws, None).await;
        let big = "SELECT 1 -- ".to_owned() + &"x".repeat((1 << 20) - 64);
        for id in 0..4 {
            request(&mut ws, id, json!({"type": "store_sql", "sql_id": id, "sql": big})).await.unwrap();
        }
        let refused = request(&mut ws, 4, json!({"type": "store_sql", "sql_id": 4, "sql": big})).await.unwrap_err();
        assert_eq!(refused["code"], "SQL_STORE_TOO_LARGE", "{refused}");
        request(&mut ws, 5, json!({"type": "close_sql", "sql_id": 0})).await.unwrap();
        request(&mut ws, 6, json!({"type": "store_sql", "sql_id": 4, "sql": big})).await.unwrap();
        still_serving().await;
        Ok(())
    });
}

#[test]
fn a_client_that_vanishes_inside_a_transaction_releases_the_write_lock() {
    run_sim(|config| config.write_lock_timeout_ms = 20_000, async {
        let (status, _) = pipeline("default", json!({"requests": [execute("CREATE TABLE t (x)"), close()]})).await;
        assert_eq!(status, StatusCode::OK);
        let (mut ws, _) = connect("hrana3").await;
        hello(&mut ws, None).await;
        request(&mut ws, 1, json!({"type": "open_stream", "stream_id": 1})).await.unwrap();
        request(&mut ws, 2, json!({"type": "execute", "stream_id": 1, "stmt": stmt("BEGIN IMMEDIATE")})).await.unwrap();
        request(&mut ws, 3, json!({"type": "execute", "stream_id": 1, "stmt": stmt("INSERT INTO t VALUES ('lost')")})).await.unwrap();
        drop(ws);
        // The server sees the socket end and rolls its stream back (under turmoil, blocking
        // work runs one task at a time: the writer must not queue before that).
        while !ws_metric("sqld_ws_streams 0").await {
            tokio::task::yield_now().await;
        }
        // A second writer gets the lock (well before its 20 s wait would run out) and the
        // vanished client's write was rolled back.
        let started = tokio::time::Instant::now();
        let (_, answer) =
            pipeline("default", json!({"requests": [execute("INSERT INTO t VALUES ('kept')"), execute("SELECT x FROM t"), close()]})).await;
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the writer waited {:?}", started.elapsed());
        assert_eq!(rows(&answer, 1), vec![json!([{"type": "text", "value": "kept"}])], "{answer}");
        Ok(())
    });
}

#[test]
fn hello_authenticates_and_a_later_hello_replaces_the_token() {
    let signer = Signer::generate();
    let key = signer.pem();
    let (rw, ro, foreign) = (signer.token(json!({})), signer.token(json!({"a": "ro"})), Signer::generate().token(json!({})));
    let expired = signer.token(json!({"exp": crate::common::tokens::epoch_secs(-3600)}));
    let elsewhere = signer.token(json!({"a": "rw", "id": "other"}));
    run_sim(move |config| config.auth_jwt_key = Some(key.clone()), async move {
        for (jwt, code) in [
            (None, "AUTH_MISSING"),
            (Some(foreign.as_str()), "AUTH_BAD_SIGNATURE"),
            (Some("not.a.jwt"), "AUTH_MALFORMED"),
            (Some(expired.as_str()), "AUTH_EXPIRED"),
            (Some(elsewhere.as_str()), "AUTH_WRONG_NAMESPACE"),
        ] {
            let (mut ws, _) = connect("hrana3").await;
            let answer = hello(&mut ws, jwt).await;
            assert_eq!(answer["type"], "hello_error", "{answer}");
            assert_eq!(answer["error"]["code"], code, "{answer}");
            assert_eq!(next(&mut ws).await.unwrap_err(), Some(1008));
        }
        let (mut ws, _) = connect("hrana2").await;
        assert_eq!(hello(&mut ws, Some(&ro)).await["type"], "hello_ok");
        request(&mut ws, 1, json!({"type": "open_stream", "stream_id": 1})).await.unwrap();
        request(&mut ws, 2, json!({"type": "execute", "stream_id": 1, "stmt": stmt("SELECT 1")})).await.unwrap();
        let refused =
            request(&mut ws, 3, json!({"type": "execute", "stream_id": 1, "stmt": stmt("CREATE TABLE t (x)")})).await.unwrap_err();
        assert_eq!(refused["code"], "AUTH_READ_ONLY", "{refused}");
        // Hrana 2: a later hello replaces the token, for the streams already open too.
        assert_eq!(hello(&mut ws, Some(&rw)).await["type"], "hello_ok");
        request(&mut ws, 4, json!({"type": "execute", "stream_id": 1, "stmt": stmt("CREATE TABLE t (x)")})).await.unwrap();
        // A refused later hello ends the socket.
        let answer = hello(&mut ws, Some(&foreign)).await;
        assert_eq!(answer["type"], "hello_error");
        assert_eq!(next(&mut ws).await.unwrap_err(), Some(1008));
        Ok(())
    });
}

#[test]
fn silent_sockets_streams_and_cursors_do_not_hold_anything_for_long() {
    run_sim(
        |config| {
            config.stream_expiry_s = 2;
            config.header_read_timeout_s = 3;
        },
        async {
            // A socket that never says hello is closed.
            let (mut silent, _) = connect("hrana3").await;
            assert_eq!(next(&mut silent).await.unwrap_err(), Some(1000));

            // A stream and a cursor left unused past the stream expiry are rolled back and
            // dropped; the socket goes on.
            let (mut ws, _) = connect("hrana3").await;
            hello(&mut ws, None).await;
            request(&mut ws, 1, json!({"type": "open_stream", "stream_id": 1})).await.unwrap();
            request(&mut ws, 2, json!({"type": "execute", "stream_id": 1, "stmt": stmt("BEGIN")})).await.unwrap();
            request(&mut ws, 3, json!({"type": "execute", "stream_id": 1, "stmt": stmt("SELECT 1")})).await.unwrap();
            request(&mut ws, 4, json!({"type": "open_stream", "stream_id": 2})).await.unwrap();
            let batch = json!({"steps": [{"stmt": stmt("SELECT 1")}]});
            request(&mut ws, 5, json!({"type": "open_cursor", "stream_id": 2, "cursor_id": 1, "batch": batch})).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_secs(4)).await;
            let expired = request(&mut ws, 6, json!({"type": "execute", "stream_id": 1, "stmt": stmt("COMMIT")})).await.unwrap_err();
            assert_eq!(expired["code"], "STREAM_EXPIRED", "{expired}");
            let gone = request(&mut ws, 7, json!({"type": "fetch_cursor", "cursor_id": 1, "max_count": 10})).await.unwrap_err();
            assert_eq!(gone["code"], "CURSOR_NOT_FOUND", "{gone}");
            assert!(ws_metric("sqld_ws_streams 0").await);
            request(&mut ws, 8, json!({"type": "close_stream", "stream_id": 1})).await.unwrap();
            request(&mut ws, 9, json!({"type": "open_stream", "stream_id": 1})).await.unwrap();
            request(&mut ws, 10, json!({"type": "execute", "stream_id": 1, "stmt": stmt("SELECT 1")})).await.unwrap();
            Ok(())
        },
    );
}

/// A `hrana3` socket to a real `sqld`, past its hello, with stream 1 open.
async fn connect_to_process(sqld: &crate::common::process::Sqld) -> WebSocketStream<tokio::net::TcpStream> {
    let stream = tokio::net::TcpStream::connect(sqld.user).await.unwrap();
    let mut request_head = format!("ws://{}/", sqld.user).into_client_request().unwrap();
    request_head.headers_mut().insert("sec-websocket-protocol", "hrana3".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(request_head, stream).await.unwrap();
    hello(&mut ws, None).await;
    request(&mut ws, 1, json!({"type": "open_stream", "stream_id": 1})).await.unwrap();
    ws
}

/// A socket's streams run side by side: a write on one stream waits for the transaction of
/// another stream of the same socket, which commits meanwhile (as `@libsql/client` does when
/// an app writes while one of its transactions is open). One request at a time per socket
/// would wait out the write lock's timeout here. A real process: under turmoil, blocking work
/// runs one task at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sockets_streams_run_side_by_side() {
    let sqld = crate::common::process::Sqld::start(&["--write-lock-timeout-ms", "20000"]);
    let mut ws = connect_to_process(&sqld).await;
    request(&mut ws, 2, json!({"type": "open_stream", "stream_id": 2})).await.unwrap();
    request(&mut ws, 3, json!({"type": "execute", "stream_id": 1, "stmt": stmt("CREATE TABLE t (x)")})).await.unwrap();
    request(&mut ws, 4, json!({"type": "execute", "stream_id": 1, "stmt": stmt("BEGIN IMMEDIATE")})).await.unwrap();
    request(&mut ws, 5, json!({"type": "execute", "stream_id": 1, "stmt": stmt("INSERT INTO t VALUES (1)")})).await.unwrap();
    // Stream 2's write (waiting for the lock) and stream 1's commit, sent back to back.
    let started = std::time::Instant::now();
    // It writes how many rows it saw: 1 if it ran after the commit.
    let write = stmt("INSERT INTO t SELECT 10 + count(*) FROM t");
    send(&mut ws, json!({"type": "request", "request_id": 6, "request": {"type": "execute", "stream_id": 2, "stmt": write}})).await;
    send(&mut ws, json!({"type": "request", "request_id": 7, "request": {"type": "execute", "stream_id": 1, "stmt": stmt("COMMIT")}}))
        .await;
    let mut answered = Vec::new();
    for _ in 0..2 {
        let answer = next(&mut ws).await.unwrap();
        assert_eq!(answer["type"], "response_ok", "{answer}");
        answered.push(answer["request_id"].as_i64().unwrap());
    }
    // Both answered (in either order: each stream's answer is sent as its own work ends),
    // and the write ran after the commit, not the other way: it saw the committed row.
    answered.sort();
    assert_eq!(answered, [6, 7]);
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "the write waited {:?}", started.elapsed());
    let rows = request(&mut ws, 8, json!({"type": "execute", "stream_id": 2, "stmt": stmt("SELECT group_concat(x) FROM (SELECT x FROM t ORDER BY x)")})).await.unwrap();
    assert_eq!(rows["result"]["rows"][0][0]["value"], "1,11");
}

/// A WebSocket request takes one of the `--max-concurrent-requests` places, as an HTTP request
/// does: with one place, held by a slow HTTP statement (about 2 s), a WebSocket `SELECT 1` is
/// answered only once that request ends. (Without the shared place it would be answered at
/// once, on another thread.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_requests_share_the_running_request_places_with_http() {
    let sqld = std::sync::Arc::new(crate::common::process::Sqld::start(&["--max-concurrent-requests", "1"]));
    let mut ws = connect_to_process(&sqld).await;

    let (done_tx, mut done_rx) = tokio::sync::oneshot::channel::<()>();
    let slow = {
        let sqld = sqld.clone();
        tokio::spawn(async move {
            let sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 20000000) SELECT count(*) FROM c";
            let (status, answer) = sqld.pipeline(json!({"requests": [{"type": "execute", "stmt": {"sql": sql}}, {"type": "close"}]})).await;
            let _ = done_tx.send(());
            assert_eq!(status, 200, "{answer}");
        })
    };
    // Once the slow statement holds the only place (its request is running), the WebSocket
    // request is sent.
    let admin = format!("http://{}/metrics", sqld.admin);
    loop {
        let metrics = hyper::Client::new().get(admin.parse().unwrap()).await.unwrap();
        let metrics = String::from_utf8(hyper::body::to_bytes(metrics.into_body()).await.unwrap().to_vec()).unwrap();
        if metrics.lines().any(|l| l == "sqld_requests_running 1") {
            break;
        }
        assert!(done_rx.try_recv().is_err(), "the slow request ended before it was seen running");
        tokio::task::yield_now().await;
    }
    request(&mut ws, 2, json!({"type": "execute", "stream_id": 1, "stmt": stmt("SELECT 1")})).await.unwrap();
    // The HTTP request had ended (its answer at most on its way back); without the shared
    // place it would still have seconds to run.
    let ended = tokio::time::timeout(std::time::Duration::from_millis(500), &mut done_rx).await;
    assert!(ended.is_ok(), "the WebSocket request ran beside the HTTP one that held the only place");
    slow.await.unwrap();
}
