//! One socket's session: its hello, its streams, stored SQL and cursors, and the loop that
//! reads a message, answers it, and reads the next.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::SinkExt;
use libsql_hrana::proto::{Batch, BatchStreamReq, CursorEntry, StreamRequest, StreamResponse, StreamResult};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::time::{sleep_until, timeout, Instant};

use super::{auth_error, close, close_code, error, Socket, Version};
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

/// What a request answers.
enum Answer {
    Json(Value),
    /// A stream request's response and the budget its size holds until it is sent.
    Stream(StreamResponse, ResponseBudget),
    Fetched { entries: Vec<CursorEntry>, done: bool },
}

/// What to do after a message.
enum Next {
    /// Send this text; the budget its answer holds goes once it is sent.
    Send(String, Option<ResponseBudget>),
    /// Send this (if anything), then close with the frame.
    Close(Option<String>, Message),
}

impl Session {
    pub fn new(server: Socket, version: Version) -> Self {
        Session { server, version, hello: None, streams: HashMap::new(), sqls: SqlStore::default(), cursors: HashMap::new() }
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
                Some(Ok(Message::Binary(_))) => {
                    Next::Close(None, close(close_code::UNSUPPORTED, "binary messages need the hrana3-protobuf subprotocol"))
                }
                Some(Ok(Message::Text(text))) => self.handle(&text).await,
            };
            if self.hello.is_some() {
                deadline = Instant::now() + self.server.limits.idle_timeout;
            }
            let sent = match next {
                Next::Send(answer, budget) => {
                    let sent = send(within, &mut socket, Message::Text(answer)).await;
                    drop(budget);
                    sent
                }
                Next::Close(answer, frame) => {
                    if let Some(answer) = answer {
                        let _ = send(within, &mut socket, Message::Text(answer)).await;
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

    async fn handle(&mut self, text: &str) -> Next {
        // Typed from the text: a hostile field (a huge array for `jwt`) is refused, not built.
        let Ok(message) = serde_json::from_str::<Envelope<'_>>(text) else {
            return Next::Close(None, close(close_code::PROTOCOL, "a message that is not a Hrana message"));
        };
        match message.kind.as_deref() {
            Some("hello") => self.hello(message.jwt),
            Some("request") => {
                let Some(id) = message.request_id.and_then(|id| i32::try_from(id).ok()) else {
                    return Next::Close(None, close(close_code::PROTOCOL, "a request without a 32-bit request_id"));
                };
                let Some(token) = self.hello.clone() else {
                    return Next::Close(None, close(close_code::PROTOCOL, "a request before hello"));
                };
                if self.streams.len() >= 2 * self.server.limits.max_streams {
                    return Next::Close(None, close(close_code::POLICY, "too many stream ids in use; close streams"));
                }
                let raw = message.request.map_or("null", RawValue::get);
                let answer = match self.authorized(token.as_deref()) {
                    Ok(access) => self.request(raw, access).await,
                    Err(e) => Err(e),
                };
                match answer {
                    Ok(answer) => respond_ok(id, answer),
                    Err(e) => Next::Send(json!({ "type": "response_error", "request_id": id, "error": e }).to_string(), None),
                }
            }
            _ => Next::Close(None, close(close_code::PROTOCOL, "a message of unknown type")),
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
                Next::Send(json!({ "type": "hello_ok" }).to_string(), None)
            }
            Err(e) => {
                self.hello = None;
                let answer = json!({ "type": "hello_error", "error": e }).to_string();
                Next::Close(Some(answer), close(close_code::POLICY, "authentication failed"))
            }
        }
    }

    /// What the socket's token grants now (checked at every request: a token expires, a
    /// namespace's key changes; a cached token costs a lookup).
    fn authorized(&self, jwt: Option<&str>) -> Result<Access, Value> {
        let server = &self.server;
        let key = server.hrana.store().jwt_key(&server.ns);
        server.auth.check(Credential::Jwt(jwt), &server.ns, key.as_deref()).map_err(|e| auth_error(&e))
    }

    /// Runs one request given as its JSON text (values such as 64-bit integers are read from
    /// the text, as Hrana's types want them).
    async fn request(&mut self, raw: &str, access: Access) -> Result<Answer, Value> {
        let fields: Fields = parse(raw)?;
        let kind = fields.kind.as_str();
        self.server.metrics.count_by("sqld_ws_requests_total", "Hrana WebSocket requests, by type.", "type", request_label(kind), 1);
        let needs = match kind {
            "open_stream" | "close_stream" | "execute" | "batch" => Version::Hrana1,
            "sequence" | "describe" | "store_sql" | "close_sql" => Version::Hrana2,
            "open_cursor" | "fetch_cursor" | "close_cursor" | "get_autocommit" => Version::Hrana3,
            _ => return Err(error(format!("unknown request type {kind:?}"), "PROTO_ERROR")),
        };
        if self.version < needs {
            return Err(error(format!("{kind} needs Hrana {} or later", needs as u8), "PROTO_ERROR"));
        }
        let missing = |name: &str| error(format!("{kind} needs a 32-bit {name}"), "PROTO_ERROR");
        let stream_id = fields.stream_id.ok_or_else(|| missing("stream_id"));
        let cursor_id = fields.cursor_id.ok_or_else(|| missing("cursor_id"));
        let done = |kind: &str| Ok(Answer::Json(json!({ "type": kind })));
        match kind {
            "open_stream" => self.open_stream(stream_id?).await.and_then(|()| done(kind)),
            "close_stream" => {
                self.close_stream(stream_id?);
                done(kind)
            }
            "store_sql" => {
                let sql = fields.sql.ok_or_else(|| error("store_sql needs sql", "PROTO_ERROR"))?;
                self.sqls.store(fields.sql_id.ok_or_else(|| missing("sql_id"))?, sql).map_err(|e| stmt_error(&e))?;
                done(kind)
            }
            "close_sql" => {
                self.sqls.close(fields.sql_id.ok_or_else(|| missing("sql_id"))?);
                done(kind)
            }
            "open_cursor" => {
                let OpenCursor { batch } = parse(raw)?;
                self.open_cursor(stream_id?, cursor_id?, batch, access).await.and_then(|()| done(kind))
            }
            "fetch_cursor" => {
                let max = fields.max_count.ok_or_else(|| error("fetch_cursor needs max_count", "PROTO_ERROR"))? as usize;
                let cursor = self.cursors.get_mut(&cursor_id?).ok_or_else(|| error("no such cursor (closed, or left idle too long)", "CURSOR_NOT_FOUND"))?;
                cursor.used = Instant::now();
                let entries: Vec<CursorEntry> = cursor.entries.drain(..max.min(cursor.entries.len())).collect();
                Ok(Answer::Fetched { entries, done: cursor.entries.is_empty() })
            }
            "close_cursor" => {
                self.cursors.remove(&cursor_id?);
                done(kind)
            }
            _ => {
                // execute, batch, sequence, describe, get_autocommit: a stream request as HTTP
                // pipelines carry it, with the socket's stored SQL put in.
                let stream_id = stream_id?;
                let mut request: StreamRequest = parse(raw)?;
                resolve_stored_sql(&mut request, &self.sqls).map_err(|e| stmt_error(&e))?;
                let (result, budget) = self.on_stream(stream_id, access, move |stream, budget| stream.handle(&request, budget)).await?;
                match result {
                    StreamResult::Ok { response } => Ok(Answer::Stream(response, budget)),
                    StreamResult::Error { error } => Err(json!({ "message": error.message, "code": error.code })),
                    StreamResult::None => Err(error("no answer", "INTERNAL")),
                }
            }
        }
    }

    async fn open_stream(&mut self, stream_id: i32) -> Result<(), Value> {
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

    async fn open_cursor(&mut self, stream_id: i32, cursor_id: i32, batch: Batch, access: Access) -> Result<(), Value> {
        if self.cursors.contains_key(&cursor_id) {
            return Err(error(format!("cursor {cursor_id} is already open"), "PROTO_ERROR"));
        }
        if self.cursors.len() >= self.server.limits.max_cursors {
            return Err(error(format!("at most {} cursors may be open on one socket", self.server.limits.max_cursors), "CURSORS_EXHAUSTED"));
        }
        let mut request = StreamRequest::Batch(BatchStreamReq { batch });
        resolve_stored_sql(&mut request, &self.sqls).map_err(|e| stmt_error(&e))?;
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
    ) -> Result<(R, ResponseBudget), Value> {
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

/// A `response_ok` message, written straight from the answer's types.
fn respond_ok(request_id: i32, answer: Answer) -> Next {
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
    let ok = |response| ResponseOk { kind: "response_ok", request_id, response };
    let (text, budget) = match answer {
        Answer::Json(response) => (serde_json::to_string(&ok(response)), None),
        Answer::Stream(response, budget) => (serde_json::to_string(&ResponseOk { kind: "response_ok", request_id, response }), Some(budget)),
        Answer::Fetched { entries, done } => {
            let entries = entries.iter().map(JsonCursorEntry).collect();
            (serde_json::to_string(&ResponseOk { kind: "response_ok", request_id, response: Fetched { kind: "fetch_cursor", entries, done } }), None)
        }
    };
    match text {
        Ok(text) => Next::Send(text, budget),
        Err(e) => Next::Send(json!({ "type": "response_error", "request_id": request_id, "error": error(format!("encoding the answer: {e}"), "INTERNAL") }).to_string(), None),
    }
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

fn parse<'a, T: Deserialize<'a>>(raw: &'a str) -> Result<T, Value> {
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

fn request_error(e: &RequestError) -> Value {
    error(e.to_string(), e.code())
}

fn stmt_error(e: &StmtError) -> Value {
    let e = e.to_proto();
    error(e.message, &e.code)
}

/// The label of a request type in `/metrics`: known types only, so a client cannot make new
/// time series.
fn request_label(kind: &str) -> &'static str {
    const KNOWN: [&str; 12] = [
        "open_stream",
        "close_stream",
        "execute",
        "batch",
        "sequence",
        "describe",
        "store_sql",
        "close_sql",
        "open_cursor",
        "fetch_cursor",
        "close_cursor",
        "get_autocommit",
    ];
    KNOWN.into_iter().find(|k| *k == kind).unwrap_or("unknown")
}
