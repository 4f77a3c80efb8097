//! Hrana 3 over HTTP in protobuf (`/v3-protobuf/pipeline`, `/v3-protobuf/cursor`): the same
//! requests as the JSON routes, encoded as `@libsql/hrana-client` encodes them. The messages
//! are declared here from the Hrana 3 protobuf schema (the server's crate only decodes
//! requests and encodes answers), so the test speaks the wire format, not the server's types.

use hyper::{Method, StatusCode};
use prost::Message;

use crate::common::*;

#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(message, optional, tag = "1")]
    null: Option<Empty>,
    #[prost(sint64, optional, tag = "2")]
    integer: Option<i64>,
    #[prost(double, optional, tag = "3")]
    float: Option<f64>,
    #[prost(string, optional, tag = "4")]
    text: Option<String>,
    #[prost(bytes = "vec", optional, tag = "5")]
    blob: Option<Vec<u8>>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Stmt {
    #[prost(string, optional, tag = "1")]
    sql: Option<String>,
    #[prost(message, repeated, tag = "3")]
    args: Vec<Value>,
    #[prost(bool, optional, tag = "5")]
    want_rows: Option<bool>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ExecuteReq {
    #[prost(message, optional, tag = "1")]
    stmt: Option<Stmt>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StreamReq {
    #[prost(message, optional, tag = "1")]
    close: Option<Empty>,
    #[prost(message, optional, tag = "2")]
    execute: Option<ExecuteReq>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PipelineReq {
    #[prost(string, optional, tag = "1")]
    baton: Option<String>,
    #[prost(message, repeated, tag = "2")]
    requests: Vec<StreamReq>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Col {
    #[prost(string, optional, tag = "1")]
    name: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Row {
    #[prost(message, repeated, tag = "1")]
    values: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StmtResult {
    #[prost(message, repeated, tag = "1")]
    cols: Vec<Col>,
    #[prost(message, repeated, tag = "2")]
    rows: Vec<Row>,
    #[prost(uint64, tag = "3")]
    affected_row_count: u64,
    #[prost(sint64, optional, tag = "4")]
    last_insert_rowid: Option<i64>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ExecuteResp {
    #[prost(message, optional, tag = "1")]
    result: Option<StmtResult>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StreamResp {
    #[prost(message, optional, tag = "1")]
    close: Option<Empty>,
    #[prost(message, optional, tag = "2")]
    execute: Option<ExecuteResp>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Error {
    #[prost(string, tag = "1")]
    message: String,
    #[prost(string, tag = "2")]
    code: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StreamRes {
    #[prost(message, optional, tag = "1")]
    ok: Option<StreamResp>,
    #[prost(message, optional, tag = "2")]
    error: Option<Error>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PipelineResp {
    #[prost(string, optional, tag = "1")]
    baton: Option<String>,
    #[prost(message, repeated, tag = "3")]
    results: Vec<StreamRes>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct BatchStep {
    #[prost(message, optional, tag = "2")]
    stmt: Option<Stmt>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Batch {
    #[prost(message, repeated, tag = "1")]
    steps: Vec<BatchStep>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CursorReq {
    #[prost(string, optional, tag = "1")]
    baton: Option<String>,
    #[prost(message, optional, tag = "2")]
    batch: Option<Batch>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CursorResp {
    #[prost(string, optional, tag = "1")]
    baton: Option<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StepBegin {
    #[prost(uint32, tag = "1")]
    step: u32,
    #[prost(message, repeated, tag = "2")]
    cols: Vec<Col>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StepEnd {
    #[prost(uint64, tag = "1")]
    affected_row_count: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct CursorEntry {
    #[prost(message, optional, tag = "1")]
    step_begin: Option<StepBegin>,
    #[prost(message, optional, tag = "2")]
    step_end: Option<StepEnd>,
    #[prost(message, optional, tag = "4")]
    row: Option<Row>,
    #[prost(message, optional, tag = "5")]
    error: Option<Error>,
}

fn stmt(sql: &str, args: Vec<Value>) -> Stmt {
    Stmt { sql: Some(sql.into()), args, want_rows: Some(true) }
}

fn execute(sql: &str, args: Vec<Value>) -> StreamReq {
    StreamReq { execute: Some(ExecuteReq { stmt: Some(stmt(sql, args)) }), ..Default::default() }
}

fn close() -> StreamReq {
    StreamReq { close: Some(Empty {}), ..Default::default() }
}

async fn post(path: &str, body: Vec<u8>) -> (StatusCode, Vec<u8>) {
    call("primary", USER_PORT, Method::POST, path, &[("content-type", "application/x-protobuf"), ("x-namespace", "default")], body).await
}

async fn protobuf_pipeline(requests: Vec<StreamReq>) -> PipelineResp {
    let (status, body) = post("/v3-protobuf/pipeline", PipelineReq { baton: None, requests }.encode_to_vec()).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    PipelineResp::decode(body.as_slice()).expect("a protobuf answer")
}

fn result(answer: &PipelineResp, i: usize) -> StmtResult {
    let res = &answer.results[i];
    assert!(res.error.is_none(), "result {i}: {:?}", res.error);
    res.ok.clone().and_then(|ok| ok.execute).and_then(|e| e.result).expect("an execute result")
}

#[test]
fn pipelines_and_cursors_in_protobuf_answer_like_their_json_twins() {
    run_sim(|_| {}, async {
        let (status, _) = call("primary", USER_PORT, Method::GET, "/v3-protobuf", &[], "").await;
        assert_eq!(status, StatusCode::OK);
        let values = vec![
            Value { integer: Some(i64::MIN), ..Default::default() },
            Value { float: Some(0.25), ..Default::default() },
            Value { text: Some("tëxt".into()), ..Default::default() },
            Value { blob: Some(vec![0, 1, 255]), ..Default::default() },
            Value { null: Some(Empty {}), ..Default::default() },
        ];
        let answer = protobuf_pipeline(vec![
            execute("CREATE TABLE v (i, f, t, b, n)", vec![]),
            execute("INSERT INTO v VALUES (?, ?, ?, ?, ?)", values.clone()),
            execute("SELECT i, f, t, b, n FROM v", vec![]),
            execute("SELEC 1", vec![]),
            close(),
        ])
        .await;
        assert_eq!(answer.baton, None, "a closed stream has no baton");
        assert_eq!(result(&answer, 1).affected_row_count, 1);
        assert_eq!(result(&answer, 1).last_insert_rowid, Some(1));
        let selected = result(&answer, 2);
        assert_eq!(selected.cols.iter().map(|c| c.name.clone().unwrap()).collect::<Vec<_>>(), ["i", "f", "t", "b", "n"]);
        assert_eq!(selected.rows, vec![Row { values }]);
        assert_eq!(answer.results[3].error.as_ref().map(|e| e.code.as_str()), Some("SQLITE_ERROR"));

        // The same rows through JSON.
        let (_, json) = pipeline("default", serde_json::json!({"requests": [crate::common::execute("SELECT t FROM v"), crate::common::close()]})).await;
        assert_eq!(rows(&json, 0)[0][0]["value"], "tëxt");

        // A cursor: its header, then one length-delimited entry at a time.
        let request = CursorReq { baton: None, batch: Some(Batch { steps: vec![BatchStep { stmt: Some(stmt("SELECT value FROM generate_series(1, 3)", vec![])) }] }) };
        let (status, body) = post("/v3-protobuf/cursor", request.encode_to_vec()).await;
        assert_eq!(status, StatusCode::OK);
        let mut rest = body.as_slice();
        CursorResp::decode_length_delimited(&mut rest).unwrap();
        let mut entries = Vec::new();
        while !rest.is_empty() {
            entries.push(CursorEntry::decode_length_delimited(&mut rest).unwrap());
        }
        assert_eq!(entries.len(), 5, "{entries:?}");
        assert_eq!(entries[0].step_begin.as_ref().map(|b| b.step), Some(0));
        let ints: Vec<i64> = entries[1..4].iter().map(|e| e.row.as_ref().unwrap().values[0].integer.unwrap()).collect();
        assert_eq!(ints, [1, 2, 3]);
        assert!(entries[4].step_end.is_some());
        Ok(())
    });
}

#[test]
fn malformed_protobuf_bodies_are_400_and_the_server_goes_on() {
    run_sim(|_| {}, async {
        let valid = PipelineReq { baton: None, requests: vec![execute("SELECT 1", vec![]), close()] }.encode_to_vec();
        // Not protobuf at all, a valid message cut short, a length past the end, and (for a
        // pipeline) a request whose wire type does not match its field.
        let bodies: Vec<(Vec<u8>, &[&str])> = vec![
            (vec![0xff; 64], &["/v3-protobuf/pipeline", "/v3-protobuf/cursor"]),
            (valid[..valid.len() - 3].to_vec(), &["/v3-protobuf/pipeline", "/v3-protobuf/cursor"]),
            (vec![0x12, 0x80], &["/v3-protobuf/pipeline", "/v3-protobuf/cursor"]),
            (vec![0x0a, 0x05, 0x41], &["/v3-protobuf/pipeline", "/v3-protobuf/cursor"]),
            (vec![0x12, 0x02, 0x10, 0x05], &["/v3-protobuf/pipeline"]),
        ];
        for (body, paths) in bodies {
            for path in paths {
                let (status, answer) = post(path, body.clone()).await;
                assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body:?}: {}", String::from_utf8_lossy(&answer));
            }
        }
        let answer = protobuf_pipeline(vec![execute("SELECT 1", vec![]), close()]).await;
        assert_eq!(result(&answer, 0).rows.len(), 1);
        Ok(())
    });
}
