//! gRPC replication (`wal_log.ReplicationLog`, `proxy.Proxy`) against a real `sqld`: this
//! server's follower, built on `libsql_replication`'s own `Replicator` and injector (what
//! libSQL server replicas run), follows it over HTTP/2 through commits, compactions, a reset, a
//! `kill -9` of the primary and a restart of its own; `StreamExec` sessions; and bad input gets
//! the statuses replicas expect while the server goes on.

use std::path::Path;
use std::time::Duration;

use futures::Stream;
use libsql_replication::rpc::proxy::proxy_client::ProxyClient;
use libsql_replication::rpc::proxy::{
    exec_req, exec_resp, query, query_result, resp_step, DisconnectMessage, ExecReq, ExecResp, Finish, Positional, Program, ProgramReq,
    Query, Step, StreamProgramReq, Value as ProxyValue,
};
use libsql_replication::rpc::replication::log_offset::WalFlavor;
use libsql_replication::rpc::replication::replication_log_client::ReplicationLogClient;
use libsql_replication::rpc::replication::{HelloRequest, LogOffset};
use libsql_server::namespace::NamespaceName;
use libsql_server::replica::Follower;
use serde_json::json;
use tonic::metadata::BinaryMetadataValue;
use tonic::transport::Channel;
use tonic::Code;

use crate::common::process::{assert_copy_follows, rows, Sqld};
use crate::common::tokens::Signer;

async fn client(sqld: &Sqld) -> ReplicationLogClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", sqld.grpc)).unwrap().connect_lazy();
    ReplicationLogClient::new(channel)
}

/// Follows `sqld`'s default namespace into `dir` (this server's own follower, built on
/// `libsql_replication`'s replicator and injector, as the libSQL server's replicas are).
fn follower(sqld: &Sqld, dir: &Path) -> Follower {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", sqld.grpc)).unwrap().connect_lazy();
    Follower::start(channel, NamespaceName::default_namespace(), None, dir.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn this_servers_follower_follows_over_http2_through_compactions_resets_kills_and_restarts() {
    let args = ["--max-log-size", "1", "--idle-connection-timeout-s", "4"];
    let mut sqld = Sqld::start(&args);
    let conn = sqld.connect().await;
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)", ()).await.unwrap();
    conn.execute("INSERT INTO t SELECT value, randomblob(100) FROM generate_series(1, 20000)", ()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let replica = follower(&sqld, dir.path());
    assert_copy_follows(&sqld.connect().await, dir.path()).await;
    let bootstrap_frames = frames_served(&sqld).await;

    for i in 0..3 {
        conn.execute("INSERT INTO t VALUES (?1, randomblob(50))", [100_000 + i]).await.unwrap();
        assert_copy_follows(&sqld.connect().await, dir.path()).await;
    }
    // Compactions, while the replica follows.
    for round in 0..4 {
        conn.execute("UPDATE t SET v = randomblob(120) WHERE id % 4 = ?1", [round]).await.unwrap();
    }
    assert_copy_follows(&sqld.connect().await, dir.path()).await;
    // A reset: a new log_id; the replica starts over from the new log's image.
    let (status, body) = sqld.admin_post("/v1/namespaces/default/reset-replication").await;
    assert_eq!(status, 200, "{body}");
    conn.execute("DELETE FROM t WHERE id % 5 = 0", ()).await.unwrap();
    assert_copy_follows(&sqld.connect().await, dir.path()).await;
    // kill -9 of the primary: its log is rebuilt at the next open, and a new session starts.
    tokio::task::block_in_place(|| {
        sqld.signal("KILL");
        sqld.spawn(&args);
    });
    sqld.connect().await.execute("UPDATE t SET v = x'01' WHERE id % 7 = 0", ()).await.unwrap();
    assert_copy_follows(&sqld.connect().await, dir.path()).await;

    // The replica stops and starts again from its own files: it resumes where it stood,
    // pulling only what it misses, not its whole copy again.
    drop(replica);
    sqld.connect().await.execute("INSERT INTO t VALUES (500000, x'02')", ()).await.unwrap();
    let before = frames_served(&sqld).await;
    let replica = follower(&sqld, dir.path());
    let stats = sqld.admin_get("/v1/namespaces/default/stats").await;
    let last = stats["replication"]["last_frame_no"].as_u64().unwrap();
    assert!(replica.wait_for(last, Duration::from_secs(30)).await, "the copy reaches the primary's last frame");
    assert_copy_follows(&sqld.connect().await, dir.path()).await;
    let pulled = frames_served(&sqld).await - before;
    assert!(pulled < bootstrap_frames / 10, "resumed with {pulled} frames (a bootstrap took {bootstrap_frames})");
    assert!(replica.progress().borrow().applied.is_some());
}

async fn frames_served(sqld: &Sqld) -> u64 {
    crate::common::process::metric(sqld, "sqld_replication_frames_served_total{namespace=\"default\"}").await
}

/// Sets the namespace and credential metadata of a request.
fn decorate<T>(request: &mut tonic::Request<T>, namespace: Option<&str>, token: Option<&str>) {
    if let Some(ns) = namespace {
        request.metadata_mut().insert_bin("x-namespace-bin", BinaryMetadataValue::from_bytes(ns.as_bytes()));
    }
    if let Some(token) = token {
        request.metadata_mut().insert("x-authorization", format!("Bearer {token}").parse().unwrap());
    }
}

fn request<T>(message: T, namespace: Option<&str>, token: Option<&str>, session: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    decorate(&mut request, namespace, token);
    if let Some(session) = session {
        request.metadata_mut().insert("x-session-token", session.parse().unwrap());
    }
    request
}

fn offset(next_offset: u64) -> LogOffset {
    LogOffset { next_offset, wal_flavor: None }
}

fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, message: Option<&str>) {
    let status = result.expect_err("a refusal");
    assert_eq!(status.code(), code, "{status:?}");
    if let Some(message) = message {
        assert_eq!(status.message(), message, "{status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grpc_input_gets_the_statuses_replicas_expect_and_the_server_goes_on() {
    let signer = Signer::generate();
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("key.pem");
    std::fs::write(&key_file, signer.pem()).unwrap();
    let key_arg = key_file.to_str().unwrap().to_owned();
    let args = ["--enable-namespaces", "--auth-jwt-key-file", &key_arg];
    let mut sqld = Sqld::start(&args);
    let (status, body) = sqld.admin_post("/v1/namespaces/tenant/create").await;
    assert_eq!(status, 200, "{body}");
    let token = signer.token(json!({}));
    let pipeline = json!({"requests": [{"type": "execute", "stmt": {"sql": "CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)"}}]});
    assert_eq!(sqld.pipeline_as("tenant", Some(&token), pipeline).await.0, 200);
    let only_other = signer.token(json!({"id": "other"}));
    let tok = Some(token.as_str());
    let mut c = client(&sqld).await;

    // Credentials: none, another namespace's.
    assert_status(c.hello(request(HelloRequest::new(), Some("tenant"), None, None)).await, Code::Unauthenticated, None);
    assert_status(c.hello(request(HelloRequest::new(), Some("tenant"), Some(&only_other), None)).await, Code::PermissionDenied, None);
    // Unknown and malformed namespaces.
    assert_status(
        c.hello(request(HelloRequest::new(), Some("missing"), tok, None)).await,
        Code::FailedPrecondition,
        Some("NAMESPACE_DOESNT_EXIST"),
    );
    assert_status(c.hello(request(HelloRequest::new(), Some("../etc"), tok, None)).await, Code::InvalidArgument, None);

    let hello = c.hello(request(HelloRequest::new(), Some("tenant"), tok, None)).await.unwrap().into_inner();
    let session = String::from_utf8(hello.session_token.to_vec()).unwrap();
    assert!(session.parse::<uuid::Uuid>().is_ok() && hello.log_id.parse::<uuid::Uuid>().is_ok(), "{hello:?}");
    let end = hello.current_replication_index.map_or(0, |f| f + 1);
    // No session token, or one that is not this log's: hello first.
    for session in [None, Some("not a token"), Some("8f4c3c63-0f6d-4c4b-9d0a-4c1f1a9a2b3c")] {
        assert_status(
            c.batch_log_entries(request(offset(0), Some("tenant"), tok, session)).await,
            Code::FailedPrecondition,
            Some("NO_HELLO"),
        );
    }
    // Past the end: only a snapshot makes such a replica consistent.
    let s = Some(session.as_str());
    assert_status(
        c.batch_log_entries(request(offset(end + 10), Some("tenant"), tok, s)).await,
        Code::FailedPrecondition,
        Some("NEED_SNAPSHOT"),
    );
    assert_status(c.log_entries(request(offset(end + 10), Some("tenant"), tok, s)).await, Code::FailedPrecondition, Some("NEED_SNAPSHOT"));
    // At the end: nothing to send.
    assert!(c.batch_log_entries(request(offset(end), Some("tenant"), tok, s)).await.unwrap().into_inner().frames.is_empty());
    // Frames of another layout than SQLite's are not served.
    let libsql_flavor = LogOffset { next_offset: 0, wal_flavor: Some(WalFlavor::Libsql as i32) };
    assert_status(c.batch_log_entries(request(libsql_flavor, Some("tenant"), tok, s)).await, Code::InvalidArgument, None);

    // Forwarded writes (proxy.Proxy): the same credentials and admission as Hrana.
    let mut proxy = ProxyClient::new(tonic::transport::Endpoint::from_shared(format!("http://{}", sqld.grpc)).unwrap().connect_lazy());
    let program = |sql: &str, values: Vec<Vec<u8>>| ProgramReq {
        client_id: "c1".into(),
        pgm: Some(Program {
            steps: vec![Step {
                cond: None,
                query: Some(Query {
                    stmt: sql.into(),
                    params: Some(query::Params::Positional(Positional {
                        values: values.into_iter().map(|data| ProxyValue { data }).collect(),
                    })),
                    skip_rows: false,
                }),
            }],
        }),
    };
    let read_only = signer.token(json!({"a": "ro"}));
    let answer = proxy
        .execute(request(program("INSERT INTO t VALUES (1, x'00')", vec![]), Some("tenant"), Some(&read_only), None))
        .await
        .unwrap()
        .into_inner();
    let error = match &answer.results[0].row_result {
        Some(query_result::RowResult::Error(e)) => e.message.clone(),
        other => panic!("a read-only grant must not write: {other:?}"),
    };
    assert!(error.contains("read-only"), "{error}");
    assert_status(
        proxy.execute(request(program("SELECT 1", vec![]), Some("tenant"), Some(&only_other), None)).await,
        Code::PermissionDenied,
        None,
    );
    assert_status(
        proxy.execute(request(program("SELECT ?1", vec![vec![7, 0, 0, 0]]), Some("tenant"), tok, None)).await,
        Code::InvalidArgument,
        None,
    );
    // A small message that would decode into a huge program (empty steps, 2 bytes each) is
    // refused before it is decoded; without a credential, before it is read at all.
    let mut huge = program("SELECT 1", vec![]);
    huge.pgm.as_mut().unwrap().steps = vec![Step::default(); 262_145];
    assert_status(proxy.execute(request(huge.clone(), Some("tenant"), None, None)).await, Code::Unauthenticated, None);
    let values_hit = "sqld_limit_hits_total{limit=\"max_request_values\"}";
    assert_eq!(crate::common::process::metric(&sqld, values_hit).await, 0, "not read without a credential");
    assert!(proxy.execute(request(huge, Some("tenant"), tok, None)).await.is_err());
    assert_eq!(crate::common::process::metric(&sqld, values_hit).await, 1);
    // A transaction belongs to the credential that began it: another caller with the same
    // client_id neither ends it nor joins it.
    let other = signer.token(json!({"id": "tenant"}));
    let mut begin = program("BEGIN", vec![]);
    begin.client_id = "shared".into();
    proxy.execute(request(begin, Some("tenant"), tok, None)).await.unwrap();
    let mut insert = program("INSERT INTO t VALUES (2, x'00')", vec![]);
    insert.client_id = "shared".into();
    proxy.execute(request(insert, Some("tenant"), tok, None)).await.unwrap();
    let disconnect = DisconnectMessage { client_id: "shared".into() };
    proxy.disconnect(request(disconnect, Some("tenant"), Some(&other), None)).await.unwrap();
    let mut commit = program("COMMIT", vec![]);
    commit.client_id = "shared".into();
    let answer = proxy.execute(request(commit, Some("tenant"), tok, None)).await.unwrap().into_inner();
    assert!(matches!(&answer.results[0].row_result, Some(query_result::RowResult::Row(_))), "the owner's transaction survived: {answer:?}");
    let mut stranger = program("SELECT 1", vec![]);
    stranger.client_id = "x".repeat(129);
    assert_status(proxy.execute(request(stranger, Some("tenant"), tok, None)).await, Code::InvalidArgument, None);
    let mut long = program("SELECT 1", vec![]);
    let step = long.pgm.as_ref().unwrap().steps[0].clone();
    long.pgm.as_mut().unwrap().steps = vec![step; 1025];
    assert_status(proxy.execute(request(long, Some("tenant"), tok, None)).await, Code::InvalidArgument, None);
    let answer = proxy
        .execute(request(
            program("INSERT INTO t VALUES (?1, x'00')", vec![vec![1, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0]]),
            Some("tenant"),
            tok,
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(&answer.results[0].row_result, Some(query_result::RowResult::Row(r)) if r.affected_row_count == 1), "{answer:?}");
    assert!(answer.current_frame_no.is_some(), "the answer names the frame the write is in");

    // Malformed and oversized messages, as gRPC-web on the user port: a gRPC status (UNKNOWN
    // for a message refused before decoding, as it is read; OUT_OF_RANGE for one past the
    // size bound), never a crash.
    let malformed = vec![0u8, 0, 0, 0, 3, 0xff, 0xff, 0xff];
    let oversized = [&[0u8, 0x7f, 0xff, 0xff, 0xff][..], &[0u8; 64]].concat();
    for (body, expected) in [(malformed, "2"), (oversized, "11")] {
        let response = hyper::Client::new()
            .request(
                hyper::Request::post(format!("{}/wal_log.ReplicationLog/BatchLogEntries", sqld.url()))
                    .header("content-type", "application/grpc-web+proto")
                    .header("x-namespace-bin", "dGVuYW50")
                    .header("x-authorization", format!("Bearer {token}"))
                    .body(hyper::Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        let in_head = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
        let body = hyper::body::to_bytes(response.into_body()).await.unwrap();
        let text = String::from_utf8_lossy(&body);
        let status = in_head.or_else(|| text.split("grpc-status:").nth(1).map(|s| s.trim().split_whitespace().next().unwrap().to_owned()));
        assert_eq!(status.as_deref(), Some(expected), "{text}");
    }

    // A session from before a restart.
    tokio::task::block_in_place(|| {
        sqld.signal("TERM");
        sqld.spawn(&args);
    });
    let mut c = client(&sqld).await;
    assert_status(c.batch_log_entries(request(offset(0), Some("tenant"), tok, s)).await, Code::FailedPrecondition, Some("NO_HELLO"));
    // The server goes on serving: a hello and the frames from the start (the log's image).
    let hello = c.hello(request(HelloRequest::new(), Some("tenant"), tok, None)).await.unwrap().into_inner();
    let session = String::from_utf8(hello.session_token.to_vec()).unwrap();
    let frames = c.batch_log_entries(request(offset(0), Some("tenant"), tok, Some(&session))).await.unwrap().into_inner().frames;
    assert_eq!(frames.len() as u64, hello.current_replication_index.unwrap() + 1);
    assert!(frames.iter().all(|f| f.data.len() == 24 + 4096));
}

fn exec(request_id: u32, sqls: &[&str]) -> ExecReq {
    let steps =
        sqls.iter().map(|sql| Step { cond: None, query: Some(Query { stmt: (*sql).into(), params: None, skip_rows: false }) }).collect();
    ExecReq { request_id, request: Some(exec_req::Request::Execute(StreamProgramReq { pgm: Some(Program { steps }) })) }
}

/// The steps of a program's answer, by name, and its `Finish`.
fn step_names(answer: &ExecResp) -> (Vec<&'static str>, Option<Finish>) {
    let Some(exec_resp::Response::ProgramResp(program)) = &answer.response else { panic!("not a program answer: {answer:?}") };
    let mut finish = None;
    let names = program
        .steps
        .iter()
        .map(|s| match s.step.as_ref().unwrap() {
            resp_step::Step::Init(_) => "init",
            resp_step::Step::BeginStep(_) => "begin_step",
            resp_step::Step::FinishStep(_) => "finish_step",
            resp_step::Step::StepError(_) => "step_error",
            resp_step::Step::ColsDescription(_) => "cols",
            resp_step::Step::BeginRows(_) => "begin_rows",
            resp_step::Step::BeginRow(_) => "begin_row",
            resp_step::Step::AddRowValue(_) => "value",
            resp_step::Step::FinishRow(_) => "finish_row",
            resp_step::Step::FinishRows(_) => "finish_rows",
            resp_step::Step::Finish(f) => {
                finish = Some(f.clone());
                "finish"
            }
        })
        .collect();
    (names, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_exec_sessions_run_programs_and_one_that_vanishes_releases_the_write_lock() {
    // No transaction time limit: only the session's end can release the lock.
    let sqld = Sqld::start(&["--write-lock-timeout-ms", "30000", "--txn-timeout-s", "0"]);
    sqld.connect().await.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)", ()).await.unwrap();
    let mut proxy = ProxyClient::new(tonic::transport::Endpoint::from_shared(format!("http://{}", sqld.grpc)).unwrap().connect_lazy());

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = proxy.stream_exec(tokio_stream_of(rx)).await.unwrap().into_inner();
    tx.send(exec(7, &["BEGIN", "INSERT INTO t VALUES (1)", "SELECT id FROM t", "SELECT nope"])).await.unwrap();
    let answer = answers.message().await.unwrap().unwrap();
    assert_eq!(answer.request_id, 7);
    let (names, finish) = step_names(&answer);
    let plain = ["begin_step", "cols", "begin_rows", "finish_rows", "finish_step"];
    let with_row = ["begin_step", "cols", "begin_rows", "begin_row", "value", "finish_row", "finish_rows", "finish_step"];
    let expected: Vec<&str> = [&["init"][..], &plain, &plain, &with_row, &["begin_step", "step_error", "finish_step", "finish"]].concat();
    assert_eq!(names, expected);
    let finish = finish.unwrap();
    assert!(!finish.is_autocommit, "the session holds its transaction");

    // The replica goes away inside its transaction: its transaction is rolled back and the
    // write lock released, so another writer proceeds (it would get SQLITE_BUSY otherwise).
    drop(tx);
    drop(answers);
    let other = sqld.connect().await;
    other.execute("INSERT INTO t VALUES (2)", ()).await.unwrap();
    assert_eq!(rows(&other, "SELECT id FROM t").await, vec![vec![libsql::Value::Integer(2)]]);
}

/// A streaming call is a request in flight until it ends: a `StreamExec` session that stays
/// quiet past the idle timeout keeps its HTTP/2 connection (no pings here: tonic sends none
/// unless asked), and its next program is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_exec_session_outlives_the_idle_timeout() {
    let sqld = Sqld::start(&["--idle-connection-timeout-s", "2"]);
    let mut proxy = ProxyClient::new(tonic::transport::Endpoint::from_shared(format!("http://{}", sqld.grpc)).unwrap().connect_lazy());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut answers = proxy.stream_exec(tokio_stream_of(rx)).await.unwrap().into_inner();
    tx.send(exec(1, &["SELECT 1"])).await.unwrap();
    assert_eq!(answers.message().await.unwrap().unwrap().request_id, 1);
    // Quiet for twice the idle timeout: the behaviour under test is the passing of time.
    tokio::time::sleep(Duration::from_secs(4)).await;
    tx.send(exec(2, &["SELECT 2"])).await.unwrap();
    let answer = answers.message().await.expect("the session's connection is still open").expect("an answer");
    assert_eq!(answer.request_id, 2);
}

/// A request stream for a client-streaming call, from a channel.
fn tokio_stream_of<T: Send + 'static>(rx: tokio::sync::mpsc::Receiver<T>) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_message_trickled_slower_than_the_body_timeout_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sqld = Sqld::start(&["--body-read-timeout-s", "1"]);
    // A gRPC-web Hello whose message never finishes arriving.
    let mut stream = tokio::net::TcpStream::connect(sqld.user).await.unwrap();
    let head = "POST /wal_log.ReplicationLog/Hello HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/grpc-web+proto\r\ncontent-length: 100\r\n\r\n";
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&[0, 0, 0, 0, 95, 8]).await.unwrap();
    // The answer comes (bounded here only so that a regression fails instead of hanging).
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.unwrap_or(0);
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || String::from_utf8_lossy(&answer).contains("grpc-status") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a trickled message: {}", String::from_utf8_lossy(&answer));
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200") && !text.contains("grpc-status:0") && !text.contains("grpc-status: 0"), "{text}");
    assert!(crate::common::process::metric(&sqld, "sqld_limit_hits_total{limit=\"body_read_timeout\"}").await >= 1);
}
