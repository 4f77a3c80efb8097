//! A socket's messages in both encodings: JSON text (`hrana1`-`hrana3`) and protobuf binary
//! (`hrana3-protobuf`) read into one typed [`Request`], and answers written from their types.

use axum::extract::ws::Message;
use libsql_hrana::proto::{
    Batch, BatchStreamReq, CursorEntry, DescribeStreamReq, Error, ExecuteStreamReq, GetAutocommitStreamReq, SequenceStreamReq,
    StreamRequest, StreamResponse,
};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;

use super::protobuf as pb;
use super::{error, Encoding, Version};
use crate::hrana::budget::ResponseBudget;
use crate::hrana::{shape, JsonCursorEntry};

/// A request, from either encoding.
pub(super) enum Request {
    OpenStream(i32),
    CloseStream(i32),
    /// execute, batch, sequence, describe, get_autocommit: as HTTP pipelines carry them.
    Stream(i32, StreamRequest),
    StoreSql(i32, String),
    CloseSql(i32),
    OpenCursor {
        stream_id: i32,
        cursor_id: i32,
        batch: Batch,
    },
    FetchCursor {
        cursor_id: i32,
        max_count: u32,
    },
    CloseCursor(i32),
}

impl Request {
    /// Its type's name (also its label in `/metrics`: a fixed set).
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Request::OpenStream(_) => "open_stream",
            Request::CloseStream(_) => "close_stream",
            Request::Stream(_, StreamRequest::Execute(_)) => "execute",
            Request::Stream(_, StreamRequest::Batch(_)) => "batch",
            Request::Stream(_, StreamRequest::Sequence(_)) => "sequence",
            Request::Stream(_, StreamRequest::Describe(_)) => "describe",
            Request::Stream(_, StreamRequest::GetAutocommit(_)) => "get_autocommit",
            Request::Stream(..) => "unknown",
            Request::StoreSql(..) => "store_sql",
            Request::CloseSql(_) => "close_sql",
            Request::OpenCursor { .. } => "open_cursor",
            Request::FetchCursor { .. } => "fetch_cursor",
            Request::CloseCursor(_) => "close_cursor",
        }
    }

    /// The Hrana version that brought the request in.
    pub(super) fn needs(&self) -> Version {
        match self.kind() {
            "open_stream" | "close_stream" | "execute" | "batch" => Version::Hrana1,
            "sequence" | "describe" | "store_sql" | "close_sql" => Version::Hrana2,
            _ => Version::Hrana3,
        }
    }
}

/// What a request answers.
pub(super) enum Answer {
    /// A response with no fields but its type.
    Done(&'static str),
    /// A stream request's response and the budget its size holds until it is sent.
    Stream(StreamResponse, ResponseBudget),
    Fetched {
        entries: Vec<CursorEntry>,
        done: bool,
    },
}

/// A client message, from either encoding.
pub(super) enum ClientMsg {
    Hello(Option<String>),
    /// A request's id, and the request (or why it could not be read: answered, not fatal).
    Request(i32, Result<Request, Error>),
}

/// Messages that carry no answer.
pub(super) enum ServerMsg {
    HelloOk,
    HelloError(Error),
    ResponseError(i32, Error),
}

/// A message that carries no answer, in the socket's encoding.
pub(super) fn server_message(encoding: Encoding, message: ServerMsg) -> Message {
    match encoding {
        Encoding::Json => Message::Text(
            match message {
                ServerMsg::HelloOk => json!({ "type": "hello_ok" }),
                ServerMsg::HelloError(error) => json!({ "type": "hello_error", "error": error }),
                ServerMsg::ResponseError(request_id, error) => {
                    json!({ "type": "response_error", "request_id": request_id, "error": error })
                }
            }
            .to_string(),
        ),
        Encoding::Protobuf => Message::Binary(
            pb::ServerMsg {
                msg: Some(match message {
                    ServerMsg::HelloOk => pb::ServerMsgKind::HelloOk(pb::Empty {}),
                    ServerMsg::HelloError(error) => pb::ServerMsgKind::HelloError(pb::HelloErrorMsg { error: Some(error) }),
                    ServerMsg::ResponseError(request_id, error) => {
                        pb::ServerMsgKind::ResponseError(pb::ResponseErrorMsg { request_id, error: Some(error) })
                    }
                }),
            }
            .encode_to_vec(),
        ),
    }
}

/// A `response_ok` message in the socket's encoding, written straight from the answer's
/// types.
pub(super) fn answer_message(encoding: Encoding, request_id: i32, answer: Answer) -> (Message, Option<ResponseBudget>) {
    match encoding {
        Encoding::Json => answer_json(request_id, answer),
        Encoding::Protobuf => {
            let (response, budget) = match answer {
                Answer::Done(kind) => (empty_response(kind), None),
                Answer::Stream(response, budget) => (stream_response(response), Some(budget)),
                Answer::Fetched { entries, done } => (Some(pb::Response::FetchCursor(pb::FetchCursorResp { entries, done })), None),
            };
            let message = pb::ServerMsg { msg: Some(pb::ServerMsgKind::ResponseOk(pb::ResponseOkMsg { request_id, response })) };
            (Message::Binary(message.encode_to_vec()), budget)
        }
    }
}

/// A JSON `response_ok` message, written straight from the answer's types.
fn answer_json(request_id: i32, answer: Answer) -> (Message, Option<ResponseBudget>) {
    #[derive(Serialize)]
    struct ResponseOk<T> {
        #[serde(rename = "type")]
        kind: &'static str,
        request_id: i32,
        response: T,
    }
    #[derive(Serialize)]
    struct Fetched<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        entries: Vec<JsonCursorEntry<'a>>,
        done: bool,
    }
    let (text, budget) = match answer {
        Answer::Done(kind) => {
            (serde_json::to_string(&ResponseOk { kind: "response_ok", request_id, response: json!({ "type": kind }) }), None)
        }
        Answer::Stream(response, budget) => {
            (serde_json::to_string(&ResponseOk { kind: "response_ok", request_id, response }), Some(budget))
        }
        Answer::Fetched { entries, done } => {
            let entries = entries.iter().map(JsonCursorEntry).collect();
            (
                serde_json::to_string(&ResponseOk {
                    kind: "response_ok",
                    request_id,
                    response: Fetched { kind: "fetch_cursor", entries, done },
                }),
                None,
            )
        }
    };
    let text = text.unwrap_or_else(|e| {
        json!({ "type": "response_error", "request_id": request_id, "error": error(format!("encoding the answer: {e}"), "INTERNAL") })
            .to_string()
    });
    (Message::Text(text), budget)
}

/// The protobuf response of a request answered by its type alone.
fn empty_response(kind: &str) -> Option<pb::Response> {
    let empty = pb::Empty {};
    Some(match kind {
        "open_stream" => pb::Response::OpenStream(empty),
        "close_stream" => pb::Response::CloseStream(empty),
        "store_sql" => pb::Response::StoreSql(empty),
        "close_sql" => pb::Response::CloseSql(empty),
        "open_cursor" => pb::Response::OpenCursor(empty),
        "close_cursor" => pb::Response::CloseCursor(empty),
        _ => return None,
    })
}

/// A stream request's response in protobuf.
fn stream_response(response: StreamResponse) -> Option<pb::Response> {
    Some(match response {
        StreamResponse::Execute(r) => pb::Response::Execute(pb::ExecuteResp { result: Some(r.result) }),
        StreamResponse::Batch(r) => pb::Response::Batch(pb::BatchResp { result: Some(r.result) }),
        StreamResponse::Sequence(_) => pb::Response::Sequence(pb::Empty {}),
        StreamResponse::Describe(r) => pb::Response::Describe(pb::DescribeResp { result: Some(r.result) }),
        StreamResponse::GetAutocommit(r) => pb::Response::GetAutocommit(pb::GetAutocommitResp { is_autocommit: r.is_autocommit }),
        StreamResponse::StoreSql(_) => pb::Response::StoreSql(pb::Empty {}),
        StreamResponse::CloseSql(_) => pb::Response::CloseSql(pb::Empty {}),
        StreamResponse::Close(_) => pb::Response::CloseStream(pb::Empty {}),
    })
}

/// Why a message holding more than `--max-request-values` values closes its socket.
const TOO_MANY_VALUES: &str = "a message holding more values than --max-request-values";

/// A JSON client message, read into typed fields from its text (a hostile field is refused,
/// not built). `Err`: a protocol violation (the socket closes).
pub(super) fn read_json(text: &str, max_values: usize) -> Result<ClientMsg, &'static str> {
    shape::check_json(text.as_bytes(), max_values).map_err(|_| TOO_MANY_VALUES)?;
    let message: Envelope<'_> = serde_json::from_str(text).map_err(|_| "a message that is not a Hrana message")?;
    match message.kind.as_deref() {
        Some("hello") => Ok(ClientMsg::Hello(message.jwt)),
        Some("request") => {
            let id = message.request_id.and_then(|id| i32::try_from(id).ok()).ok_or("a request without a 32-bit request_id")?;
            let raw = message.request.map_or("null", RawValue::get);
            Ok(ClientMsg::Request(id, json_request(raw)))
        }
        _ => Err("a message of unknown type"),
    }
}

/// A JSON request (values such as 64-bit integers are read from the text, as Hrana's types
/// want them).
fn json_request(raw: &str) -> Result<Request, Error> {
    let fields: Fields = parse(raw)?;
    let kind = fields.kind.as_str();
    let missing = |name: &str| error(format!("{kind} needs a 32-bit {name}"), "PROTO_ERROR");
    let stream_id = fields.stream_id.ok_or_else(|| missing("stream_id"));
    let cursor_id = fields.cursor_id.ok_or_else(|| missing("cursor_id"));
    Ok(match kind {
        "open_stream" => Request::OpenStream(stream_id?),
        "close_stream" => Request::CloseStream(stream_id?),
        "store_sql" => Request::StoreSql(fields.sql_id.ok_or_else(|| missing("sql_id"))?, fields.sql.ok_or_else(|| missing("sql"))?),
        "close_sql" => Request::CloseSql(fields.sql_id.ok_or_else(|| missing("sql_id"))?),
        "open_cursor" => {
            let OpenCursor { batch } = parse(raw)?;
            Request::OpenCursor { stream_id: stream_id?, cursor_id: cursor_id?, batch }
        }
        "fetch_cursor" => Request::FetchCursor { cursor_id: cursor_id?, max_count: fields.max_count.ok_or_else(|| missing("max_count"))? },
        "close_cursor" => Request::CloseCursor(cursor_id?),
        "execute" | "batch" | "sequence" | "describe" | "get_autocommit" => Request::Stream(stream_id?, parse(raw)?),
        _ => return Err(error(format!("unknown request type {kind:?}"), "PROTO_ERROR")),
    })
}

/// A protobuf client message. `Err`: a protocol violation (the socket closes).
pub(super) fn read_protobuf(bytes: &[u8], max_values: usize) -> Result<ClientMsg, &'static str> {
    shape::check_protobuf(bytes, max_values).map_err(|e| match e {
        shape::ProtobufRefused::TooManyValues(_) => TOO_MANY_VALUES,
        shape::ProtobufRefused::NotAMessage => "a message that is not a Hrana message",
    })?;
    let message = pb::ClientMsg::decode(bytes).map_err(|_| "a message that is not a Hrana message")?;
    let request = match message.msg.ok_or("a message of unknown type")? {
        pb::ClientMsgKind::Hello(hello) => return Ok(ClientMsg::Hello(hello.jwt)),
        pb::ClientMsgKind::Request(request) => request,
    };
    let missing = |what: &str| error(format!("a request without its {what}"), "PROTO_ERROR");
    let stream = |id: i32, request: StreamRequest| Request::Stream(id, request);
    let read = match request.request {
        None => Err(error("a request of unknown type", "PROTO_ERROR")),
        Some(pb::Request::OpenStream(r)) => Ok(Request::OpenStream(r.stream_id)),
        Some(pb::Request::CloseStream(r)) => Ok(Request::CloseStream(r.stream_id)),
        Some(pb::Request::Execute(r)) => {
            r.stmt.map(|stmt| stream(r.stream_id, StreamRequest::Execute(ExecuteStreamReq { stmt }))).ok_or_else(|| missing("stmt"))
        }
        Some(pb::Request::Batch(r)) => {
            r.batch.map(|batch| stream(r.stream_id, StreamRequest::Batch(BatchStreamReq { batch }))).ok_or_else(|| missing("batch"))
        }
        Some(pb::Request::OpenCursor(r)) => r
            .batch
            .map(|batch| Request::OpenCursor { stream_id: r.stream_id, cursor_id: r.cursor_id, batch })
            .ok_or_else(|| missing("batch")),
        Some(pb::Request::CloseCursor(r)) => Ok(Request::CloseCursor(r.cursor_id)),
        Some(pb::Request::FetchCursor(r)) => Ok(Request::FetchCursor { cursor_id: r.cursor_id, max_count: r.max_count }),
        Some(pb::Request::Sequence(r)) => {
            Ok(stream(r.stream_id, StreamRequest::Sequence(SequenceStreamReq { sql: r.sql, sql_id: r.sql_id, replication_index: None })))
        }
        Some(pb::Request::Describe(r)) => {
            Ok(stream(r.stream_id, StreamRequest::Describe(DescribeStreamReq { sql: r.sql, sql_id: r.sql_id, replication_index: None })))
        }
        Some(pb::Request::StoreSql(r)) => Ok(Request::StoreSql(r.sql_id, r.sql)),
        Some(pb::Request::CloseSql(r)) => Ok(Request::CloseSql(r.sql_id)),
        Some(pb::Request::GetAutocommit(r)) => Ok(stream(r.stream_id, StreamRequest::GetAutocommit(GetAutocommitStreamReq {}))),
    };
    Ok(ClientMsg::Request(request.request_id, read))
}

fn parse<'a, T: Deserialize<'a>>(raw: &'a str) -> Result<T, Error> {
    serde_json::from_str(raw).map_err(|e| error(format!("a malformed request: {e}"), "PROTO_ERROR"))
}

/// A client message as far as the socket reads it; the request's own text is kept.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: Option<String>,
    request_id: Option<i64>,
    jwt: Option<String>,
    #[serde(borrow)]
    request: Option<&'a RawValue>,
}

/// The fields of a request the socket itself reads (the rest is for the stream).
#[derive(Deserialize)]
struct Fields {
    #[serde(rename = "type")]
    kind: String,
    stream_id: Option<i32>,
    cursor_id: Option<i32>,
    sql_id: Option<i32>,
    sql: Option<String>,
    max_count: Option<u32>,
}

#[derive(Deserialize)]
struct OpenCursor {
    batch: Batch,
}
