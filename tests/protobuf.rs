//! Hrana 3 over HTTP in protobuf (`/v3-protobuf/pipeline`, `/v3-protobuf/cursor`): the same
//! requests as the JSON routes, encoded as `@libsql/hrana-client` encodes them. The messages
//! are declared here from the Hrana 3 protobuf schema (the server's crate only decodes
//! requests and encodes answers), so the test speaks the wire format, not the server's types.

use hyper::{Method, StatusCode};
use prost::Message;

use crate::common::*;

use crate::common::hrana_protobuf::{
    self as pb, Batch, BatchStep, CursorEntry, CursorReq, CursorResp, Empty, PipelineReq, PipelineResp, Row, StmtResult, StreamReq, Value,
};

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
            pb::execute("CREATE TABLE v (i, f, t, b, n)", vec![]),
            pb::execute("INSERT INTO v VALUES (?, ?, ?, ?, ?)", values.clone()),
            pb::execute("SELECT i, f, t, b, n FROM v", vec![]),
            pb::execute("SELEC 1", vec![]),
            pb::close(),
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
        let (_, json) =
            pipeline("default", serde_json::json!({"requests": [crate::common::execute("SELECT t FROM v"), crate::common::close()]})).await;
        assert_eq!(rows(&json, 0)[0][0]["value"], "tëxt");

        // A cursor: its header, then one length-delimited entry at a time.
        let request = CursorReq {
            baton: None,
            batch: Some(Batch { steps: vec![BatchStep { stmt: Some(pb::stmt("SELECT value FROM generate_series(1, 3)", vec![])) }] }),
        };
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
        let valid = PipelineReq { baton: None, requests: vec![pb::execute("SELECT 1", vec![]), pb::close()] }.encode_to_vec();
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
        let answer = protobuf_pipeline(vec![pb::execute("SELECT 1", vec![]), pb::close()]).await;
        assert_eq!(result(&answer, 0).rows.len(), 1);
        Ok(())
    });
}
