//! One socket's session: its hello, its streams, stored SQL and cursors, and the loop that
//! reads a message, answers it, and reads the next.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::SinkExt;
use libsql_hrana::proto::{
    Batch, BatchStreamReq, CursorEntry, DescribeStreamReq, Error, ExecuteStreamReq, GetAutocommitStreamReq, SequenceStreamReq, StreamRequest,
    StreamResponse, StreamResult,
};
use prost::Message as _;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use tokio::time::{sleep_until, timeout, Instant};

use super::protobuf as pb;
use super::{auth_error, close, close_code, error, Encoding, Socket, Version};
use crate::auth::{Access, Credential};
use crate::hrana::budget::ResponseBudget;
use crate::hrana::stmt::SqlStore;
use crate::hrana::{cursor_entries, drop_off_runtime, Held, JsonCursorEntry, RequestError, StmtError, Stream};
use crate::limit_hits::Limit;

/// How often a socket looks for streams and cursors left idle too long.
const EXPIRY_CHECK: Duration = Duration::from_millis(500);

/// How long a socket closed by the server waits for the client's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

pub struct Session {
    server: Socket,
    version: Version,
    encoding: Encoding,
    /// The token of the last `hello` (checked again at every request: it may expire); `None`
    /// inside means the hello carried none.
    hello: Option<Option<String>>,
    streams: HashMap<i32, Slot>,
    /// Stored SQL belongs to the socket (Hrana 2), shared by its streams.
    sqls: SqlStore,
    cursors: HashMap<i32, Cursor>,
}

/// A stream id's state.
enum Slot {
    Open { stream: Stream, _held: Held, used: Instant },
    /// Its `open_stream` failed; requests on it fail until it is closed.
    Failed,
    /// Rolled back: its transaction held the write lock too long, or it sat idle too long.
    Expired,
}

/// A cursor's entries, fetched a few at a time, with the budget their size holds.
struct Cursor {
    entries: VecDeque<CursorEntry>,
    used: Instant,
    _budget: ResponseBudget,
}

/// A request, from either encoding.
enum Request {
    OpenStream(i32),
    CloseStream(i32),
    /// execute, batch, sequence, describe, get_autocommit: as HTTP pipelines carry them.
    Stream(i32, StreamRequest),
    StoreSql(i32, String),
    CloseSql(i32),
    OpenCursor { stream_id: i32, cursor_id: i32, batch: Batch },
    FetchCursor { cursor_id: i32, max_count: u32 },
    CloseCursor(i32),
}

impl Request {
    /// Its type's name (also its label in `/metrics`: a fixed set).
    fn kind(&self) -> &'static str {
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
    fn needs(&self) -> Version {
        match self.kind() {
            "open_stream" | "close_stream" | "execute" | "batch" => Version::Hrana1,
            "sequence" | "describe" | "store_sql" | "close_sql" => Version::Hrana2,
            _ => Version::Hrana3,
        }
    }
}

/// What a request answers.
enum Answer {
    /// A response with no fields but its type.
    Done(&'static str),
    /// A stream request's response and the budget its size holds until it is sent.
    Stream(StreamResponse, ResponseBudget),
    Fetched { entries: Vec<CursorEntry>, done: bool },
}

/// What to do after a message.
enum Next {
    /// Send this; the budget its answer holds goes once it is sent.
    Send(Message, Option<ResponseBudget>),
    /// Send this (if anything), then close with the frame.
    Close(Option<Message>, Message),
}

/// A client message, from either encoding.
enum ClientMsg {
    Hello(Option<String>),
    /// A request's id, and the request (or why it could not be read: answered, not fatal).
    Request(i32, Result<Request, Error>),
}

/// Messages that carry no answer.
enum ServerMsg {
    HelloOk,
    HelloError(Error),
    ResponseError(i32, Error),
}

impl Session {
    pub fn new(server: Socket, version: Version, encoding: Encoding) -> Self {
        Session { server, version, encoding, hello: None, streams: HashMap::new(), sqls: SqlStore::default(), cursors: HashMap::new() }
    }

    pub async fn run(mut self, mut socket: WebSocket) {
        let within = self.server.limits.send_timeout;
        // Until its hello, a socket gets as long as an HTTP client for its request head.
        let mut deadline = Instant::now() + within;
        let mut expiry = tokio::time::interval(EXPIRY_CHECK);
        let mut stop = self.server.stop.clone();
        loop {
            let message = tokio::select! {
                message = socket.recv() => message,
                _ = expiry.tick() => {
                    self.expire();
                    continue;
                }
                _ = stop.changed() => {
                    let _ = send(within, &mut socket, close(close_code::GOING_AWAY, "the server is shutting down")).await;
                    break;
                }
                _ = sleep_until(deadline) => {
                    let why = if self.hello.is_none() { "no hello" } else { "idle" };
                    let _ = send(within, &mut socket, close(close_code::NORMAL, why)).await;
                    break;
                }
            };
            let next = match message {
                None | Some(Err(_)) => break,
                Some(Ok(Message::Close(_))) => {
                    // tungstenite queued the reply to the client's close: send it.
                    let _ = timeout(within, socket.flush()).await;
                    break;
                }
                // Pings are answered by the socket itself; they do not keep it alive.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Text(text))) if self.encoding == Encoding::Json => match read_json(&text) {
                    Ok(message) => self.handle(message).await,
                    Err(why) => Next::Close(None, close(close_code::PROTOCOL, why)),
                },
                Some(Ok(Message::Binary(bytes))) if self.encoding == Encoding::Protobuf => match read_protobuf(&bytes) {
                    Ok(message) => self.handle(message).await,
                    Err(why) => Next::Close(None, close(close_code::PROTOCOL, why)),
                },
                Some(Ok(_)) => Next::Close(None, close(close_code::UNSUPPORTED, "text messages are JSON (hrana1-3), binary ones protobuf (hrana3-protobuf)")),
            };
            if self.hello.is_some() {
                deadline = Instant::now() + self.server.limits.idle_timeout;
            }
            let sent = match next {
                Next::Send(answer, budget) => {
                    let sent = send(within, &mut socket, answer).await;
                    drop(budget);
                    sent
                }
                Next::Close(answer, frame) => {
                    if let Some(answer) = answer {
                        let _ = send(within, &mut socket, answer).await;
                    }
                    if send(within, &mut socket, frame).await {
                        finish_closing(&mut socket).await;
                    }
                    false
                }
            };
            if !sent {
                break;
            }
        }
        self.close_everything().await;
    }

    async fn handle(&mut self, message: ClientMsg) -> Next {
        match message {
            ClientMsg::Hello(jwt) => self.hello(jwt),
            ClientMsg::Request(id, request) => {
                let Some(token) = self.hello.clone() else {
                    return Next::Close(None, close(close_code::PROTOCOL, "a request before hello"));
                };
                if self.streams.len() >= 2 * self.server.limits.max_streams {
                    return Next::Close(None, close(close_code::POLICY, "too many stream ids in use; close streams"));
                }
                let answer = match (self.authorized(token.as_deref()), request) {
                    (Ok(access), Ok(request)) => self.request(request, access).await,
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                match answer {
                    Ok(answer) => self.respond_ok(id, answer),
                    Err(e) => Next::Send(self.server_msg(ServerMsg::ResponseError(id, e)), None),
                }
            }
        }
    }

    /// The first `hello` authenticates the socket; a later one (Hrana 2 and 3) replaces the
    /// token. A refused one ends the socket.
    fn hello(&mut self, jwt: Option<String>) -> Next {
        if self.hello.is_some() && self.version < Version::Hrana2 {
            return Next::Close(None, close(close_code::PROTOCOL, "Hrana 1 allows one hello"));
        }
        match self.authorized(jwt.as_deref()) {
            Ok(_) => {
                self.hello = Some(jwt);
                Next::Send(self.server_msg(ServerMsg::HelloOk), None)
            }
            Err(e) => {
                self.hello = None;
                Next::Close(Some(self.server_msg(ServerMsg::HelloError(e))), close(close_code::POLICY, "authentication failed"))
            }
        }
    }

    /// A message that carries no answer, in the socket's encoding.
    fn server_msg(&self, message: ServerMsg) -> Message {
        match self.encoding {
            Encoding::Json => Message::Text(
                match message {
                    ServerMsg::HelloOk => json!({ "type": "hello_ok" }),
                    ServerMsg::HelloError(error) => json!({ "type": "hello_error", "error": error }),
                    ServerMsg::ResponseError(request_id, error) => json!({ "type": "response_error", "request_id": request_id, "error": error }),
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
    fn respond_ok(&self, request_id: i32, answer: Answer) -> Next {
        match self.encoding {
            Encoding::Json => respond_ok_json(request_id, answer),
            Encoding::Protobuf => {
                let (response, budget) = match answer {
                    Answer::Done(kind) => (empty_response(kind), None),
                    Answer::Stream(response, budget) => (stream_response(response), Some(budget)),
                    Answer::Fetched { entries, done } => (Some(pb::Response::FetchCursor(pb::FetchCursorResp { entries, done })), None),
                };
                let message = pb::ServerMsg { msg: Some(pb::ServerMsgKind::ResponseOk(pb::ResponseOkMsg { request_id, response })) };
                Next::Send(Message::Binary(message.encode_to_vec()), budget)
            }
        }
    }

    /// What the socket's token grants now (checked at every request: a token expires, a
    /// namespace's key changes; a cached token costs a lookup).
    fn authorized(&self, jwt: Option<&str>) -> Result<Access, Error> {
        let server = &self.server;
        let key = server.hrana.store().jwt_key(&server.ns);
        server.auth.check(Credential::Jwt(jwt), &server.ns, key.as_deref()).map_err(|e| auth_error(&e))
    }

    async fn request(&mut self, request: Request, access: Access) -> Result<Answer, Error> {
        let kind = request.kind();
        self.server.metrics.count_by("sqld_ws_requests_total", "Hrana WebSocket requests, by type.", "type", kind, 1);
        if self.version < request.needs() {
            return Err(error(format!("{kind} needs Hrana {} or later", request.needs() as u8), "PROTO_ERROR"));
        }
        match request {
            Request::OpenStream(stream_id) => self.open_stream(stream_id).await.map(|()| Answer::Done(kind)),
            Request::CloseStream(stream_id) => {
                self.close_stream(stream_id);
                Ok(Answer::Done(kind))
            }
            Request::StoreSql(sql_id, sql) => {
                self.sqls.store(sql_id, sql).map_err(|e| e.to_proto())?;
                Ok(Answer::Done(kind))
            }
            Request::CloseSql(sql_id) => {
                self.sqls.close(sql_id);
                Ok(Answer::Done(kind))
            }
            Request::OpenCursor { stream_id, cursor_id, batch } => {
                self.open_cursor(stream_id, cursor_id, batch, access).await.map(|()| Answer::Done(kind))
            }
            Request::FetchCursor { cursor_id, max_count } => {
                let cursor = self.cursors.get_mut(&cursor_id).ok_or_else(|| error("no such cursor (closed, or left idle too long)", "CURSOR_NOT_FOUND"))?;
                cursor.used = Instant::now();
                let entries: Vec<CursorEntry> = cursor.entries.drain(..(max_count as usize).min(cursor.entries.len())).collect();
                Ok(Answer::Fetched { entries, done: cursor.entries.is_empty() })
            }
            Request::CloseCursor(cursor_id) => {
                self.cursors.remove(&cursor_id);
                Ok(Answer::Done(kind))
            }
            Request::Stream(stream_id, mut request) => {
                resolve_stored_sql(&mut request, &self.sqls).map_err(|e| e.to_proto())?;
                let (result, budget) = self.on_stream(stream_id, access, move |stream, budget| stream.handle(&request, budget)).await?;
                match result {
                    StreamResult::Ok { response } => Ok(Answer::Stream(response, budget)),
                    StreamResult::Error { error } => Err(error),
                    StreamResult::None => Err(error("no answer", "INTERNAL")),
                }
            }
        }
    }

    async fn open_stream(&mut self, stream_id: i32) -> Result<(), Error> {
        if self.streams.contains_key(&stream_id) {
            return Err(error(format!("stream {stream_id} is already open"), "PROTO_ERROR"));
        }
        let open = self.streams.values().filter(|s| matches!(s, Slot::Open { .. })).count();
        if open >= self.server.limits.max_streams {
            self.streams.insert(stream_id, Slot::Failed);
            self.server.metrics.hits.hit(Limit::StreamsPerConnection, format_args!("namespace {}: a WebSocket", self.server.ns));
            return Err(error(format!("at most {} streams may be open on one socket", self.server.limits.max_streams), "STREAMS_EXHAUSTED"));
        }
        match self.server.hrana.open_held(&self.server.ns).await {
            Ok((stream, held)) => {
                self.streams.insert(stream_id, Slot::Open { stream, _held: held, used: Instant::now() });
                self.server.metrics.gauge_add("sqld_ws_streams", 1);
                Ok(())
            }
            Err(e) => {
                self.streams.insert(stream_id, Slot::Failed);
                Err(request_error(&e))
            }
        }
    }

    fn close_stream(&mut self, stream_id: i32) {
        if let Some(Slot::Open { stream, _held, .. }) = self.streams.remove(&stream_id) {
            self.server.metrics.gauge_add("sqld_ws_streams", -1);
            drop_off_runtime(vec![stream]);
        }
    }

    async fn open_cursor(&mut self, stream_id: i32, cursor_id: i32, batch: Batch, access: Access) -> Result<(), Error> {
        if self.cursors.contains_key(&cursor_id) {
            return Err(error(format!("cursor {cursor_id} is already open"), "PROTO_ERROR"));
        }
        if self.cursors.len() >= self.server.limits.max_cursors {
            return Err(error(format!("at most {} cursors may be open on one socket", self.server.limits.max_cursors), "CURSORS_EXHAUSTED"));
        }
        let mut request = StreamRequest::Batch(BatchStreamReq { batch });
        resolve_stored_sql(&mut request, &self.sqls).map_err(|e| e.to_proto())?;
        let StreamRequest::Batch(BatchStreamReq { batch }) = request else { unreachable!("a batch stays a batch") };
        let (result, budget) = self.on_stream(stream_id, access, move |stream, budget| stream.run_batch(&batch, budget)).await?;
        let entries = match result {
            Ok(result) => cursor_entries(result),
            Err(e) => vec![CursorEntry::Error { error: e.to_proto() }],
        };
        self.cursors.insert(cursor_id, Cursor { entries: entries.into(), used: Instant::now(), _budget: budget });
        Ok(())
    }

    /// Runs `f` on the open stream `stream_id` (on the blocking pool), then puts it back.
    async fn on_stream<R: Send + 'static>(
        &mut self,
        stream_id: i32,
        access: Access,
        f: impl FnOnce(&mut Stream, &mut ResponseBudget) -> R + Send + 'static,
    ) -> Result<(R, ResponseBudget), Error> {
        let (stream, held) = match self.streams.remove(&stream_id) {
            Some(Slot::Open { stream, _held, .. }) => (stream, _held),
            Some(other) => {
                let why = match other {
                    Slot::Expired => error("the stream was rolled back: it sat idle, or held the write lock, too long", "STREAM_EXPIRED"),
                    _ => error(format!("stream {stream_id} failed to open"), "STREAM_NOT_FOUND"),
                };
                self.streams.insert(stream_id, other);
                return Err(why);
            }
            None => return Err(error(format!("no stream {stream_id} is open"), "STREAM_NOT_FOUND")),
        };
        match self.server.hrana.run_held(stream, access, None, f).await {
            Ok((stream, result, budget)) => {
                self.streams.insert(stream_id, Slot::Open { stream, _held: held, used: Instant::now() });
                Ok((result, budget))
            }
            Err(e) => {
                self.streams.insert(stream_id, Slot::Failed);
                self.server.metrics.gauge_add("sqld_ws_streams", -1);
                Err(request_error(&e))
            }
        }
    }

    /// Rolls back (and drops) the streams left idle past the stream expiry, or whose
    /// transaction held the write lock past its time limit, while the client said nothing;
    /// drops cursors left unfetched as long (their answers hold the response bound).
    fn expire(&mut self) {
        let expiry = self.server.limits.stream_expiry;
        let mut expired = Vec::new();
        for (id, slot) in &self.streams {
            if let Slot::Open { stream, used, .. } = slot {
                if stream.transaction_expired() {
                    expired.push((*id, true));
                } else if used.elapsed() > expiry {
                    expired.push((*id, false));
                }
            }
        }
        for (id, held_the_lock) in expired {
            self.close_stream(id);
            self.streams.insert(id, Slot::Expired);
            if held_the_lock {
                self.server.metrics.hits.hit(
                    Limit::TransactionTimeout,
                    format_args!("namespace {}: an idle WebSocket transaction held the write lock; rolled back", self.server.ns),
                );
            }
        }
        self.cursors.retain(|_, cursor| cursor.used.elapsed() <= expiry);
    }

    /// The socket ended: every stream is closed (its transaction rolled back) before the
    /// socket gives its place back, so a server stopping finds none still open.
    async fn close_everything(&mut self) {
        let mut streams = Vec::new();
        for (_, slot) in self.streams.drain() {
            if let Slot::Open { stream, _held, .. } = slot {
                streams.push((stream, _held));
            }
        }
        self.cursors.clear();
        let count = streams.len() as i64;
        if count > 0 {
            let _ = crate::blocking::run(move || drop(streams)).await;
            self.server.metrics.gauge_add("sqld_ws_streams", -count);
        }
    }
}

/// A JSON `response_ok` message, written straight from the answer's types.
fn respond_ok_json(request_id: i32, answer: Answer) -> Next {
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
        Answer::Done(kind) => (serde_json::to_string(&ResponseOk { kind: "response_ok", request_id, response: json!({ "type": kind }) }), None),
        Answer::Stream(response, budget) => (serde_json::to_string(&ResponseOk { kind: "response_ok", request_id, response }), Some(budget)),
        Answer::Fetched { entries, done } => {
            let entries = entries.iter().map(JsonCursorEntry).collect();
            (serde_json::to_string(&ResponseOk { kind: "response_ok", request_id, response: Fetched { kind: "fetch_cursor", entries, done } }), None)
        }
    };
    let text = text.unwrap_or_else(|e| {
        json!({ "type": "response_error", "request_id": request_id, "error": error(format!("encoding the answer: {e}"), "INTERNAL") }).to_string()
    });
    Next::Send(Message::Text(text), budget)
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

/// A JSON client message, read into typed fields from its text (a hostile field is refused,
/// not built). `Err`: a protocol violation (the socket closes).
fn read_json(text: &str) -> Result<ClientMsg, &'static str> {
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
fn read_protobuf(bytes: &[u8]) -> Result<ClientMsg, &'static str> {
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

/// After the server's close frame: reads (and drops) what the client still sends until its
/// own close frame, briefly. Dropping the connection with unread data would reset it, and the
/// client could lose the answer that says why it was closed.
async fn finish_closing(socket: &mut WebSocket) {
    let deadline = Instant::now() + CLOSE_GRACE;
    while let Ok(Some(Ok(message))) = tokio::time::timeout_at(deadline, socket.recv()).await {
        if matches!(message, Message::Close(_)) {
            break;
        }
    }
}

/// Sends one message, bounded in time: a client that does not read is let go.
async fn send(within: Duration, socket: &mut WebSocket, message: Message) -> bool {
    matches!(timeout(within, socket.send(message)).await, Ok(Ok(())))
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

/// Puts the socket's stored SQL into a stream request that names it by `sql_id`.
fn resolve_stored_sql(request: &mut StreamRequest, sqls: &SqlStore) -> Result<(), StmtError> {
    fn put(sql: &mut Option<String>, sql_id: &mut Option<i32>, sqls: &SqlStore) -> Result<(), StmtError> {
        if sql_id.is_some() {
            let text = sqls.resolve(sql.as_deref(), *sql_id)?.to_owned();
            *sql = Some(text);
            *sql_id = None;
        }
        Ok(())
    }
    match request {
        StreamRequest::Execute(req) => put(&mut req.stmt.sql, &mut req.stmt.sql_id, sqls),
        StreamRequest::Batch(req) => req.batch.steps.iter_mut().try_for_each(|step| put(&mut step.stmt.sql, &mut step.stmt.sql_id, sqls)),
        StreamRequest::Sequence(req) => put(&mut req.sql, &mut req.sql_id, sqls),
        StreamRequest::Describe(req) => put(&mut req.sql, &mut req.sql_id, sqls),
        _ => Ok(()),
    }
}

fn request_error(e: &RequestError) -> Error {
    error(e.to_string(), e.code())
}
