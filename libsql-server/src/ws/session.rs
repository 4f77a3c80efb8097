//! One socket's session: its hello, its streams, stored SQL and cursors, and the loop that
//! reads a message, answers it, and reads the next.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use libsql_hrana::proto::{Batch, BatchStreamReq, CursorEntry, StreamRequest, StreamResult};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::time::{sleep_until, timeout, Instant};

use super::{auth_error, close, close_code, error, Socket, Version};
use crate::auth::{Access, Credential};
use crate::hrana::budget::ResponseBudget;
use crate::hrana::stmt::SqlStore;
use crate::hrana::{cursor_entries, drop_off_runtime, Held, JsonCursorEntry, RequestError, StmtError, Stream};

/// How often a socket looks for streams whose transaction outlived its time limit.
const EXPIRY_CHECK: Duration = Duration::from_millis(500);

pub struct Session {
    server: Socket,
    version: Version,
    /// The grant of the last `hello`; `None` before the first.
    access: Option<Access>,
    streams: HashMap<i32, Slot>,
    /// Stored SQL belongs to the socket (Hrana 2), shared by its streams.
    sqls: SqlStore,
    cursors: HashMap<i32, Cursor>,
}

/// A stream id's state.
enum Slot {
    Open(Stream, Held),
    /// Its `open_stream` failed; requests on it fail until it is closed.
    Failed,
    /// Rolled back after its transaction held the write lock too long.
    Expired,
}

/// A cursor's entries, fetched a few at a time, with the budget their size holds.
struct Cursor {
    entries: VecDeque<CursorEntry>,
    _budget: ResponseBudget,
}

/// What to do after a message.
enum Next {
    Send(Value),
    /// Send this (if anything), then close with the frame.
    Close(Option<Value>, Message),
}

impl Session {
    pub fn new(server: Socket, version: Version) -> Self {
        Session { server, version, access: None, streams: HashMap::new(), sqls: SqlStore::default(), cursors: HashMap::new() }
    }

    pub async fn run(mut self, mut socket: WebSocket) {
        let mut idle_deadline = Instant::now() + self.server.limits.idle_timeout;
        let mut expiry = tokio::time::interval(EXPIRY_CHECK);
        let mut stop = self.server.stop.clone();
        let within = self.server.limits.send_timeout;
        loop {
            let message = tokio::select! {
                message = socket.recv() => message,
                _ = expiry.tick() => {
                    self.expire_transactions();
                    continue;
                }
                _ = stop.changed() => {
                    let _ = send(within, &mut socket, close(close_code::GOING_AWAY, "the server is shutting down")).await;
                    break;
                }
                _ = sleep_until(idle_deadline) => {
                    let _ = send(within, &mut socket, close(close_code::NORMAL, "idle")).await;
                    break;
                }
            };
            idle_deadline = Instant::now() + self.server.limits.idle_timeout;
            let next = match message {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(Message::Binary(_))) => {
                    Next::Close(None, close(close_code::UNSUPPORTED, "binary messages need the hrana3-protobuf subprotocol"))
                }
                Some(Ok(Message::Text(text))) => self.handle(&text).await,
            };
            let sent = match next {
                Next::Send(answer) => send(within, &mut socket, Message::Text(answer.to_string())).await,
                Next::Close(answer, frame) => {
                    if let Some(answer) = answer {
                        let _ = send(within, &mut socket, Message::Text(answer.to_string())).await;
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
        let Ok(message) = serde_json::from_str::<Envelope<'_>>(text) else {
            return Next::Close(None, close(close_code::PROTOCOL, "a message is not a JSON object"));
        };
        match message.kind.as_deref() {
            Some("hello") => self.hello(message.jwt.as_ref()),
            Some("request") => {
                let Some(id) = message.request_id.as_ref().and_then(Value::as_i64).and_then(|id| i32::try_from(id).ok()) else {
                    return Next::Close(None, close(close_code::PROTOCOL, "a request without a 32-bit request_id"));
                };
                let Some(access) = self.access else {
                    return Next::Close(None, close(close_code::PROTOCOL, "a request before hello"));
                };
                let raw = message.request.map_or("null", RawValue::get);
                let fields = serde_json::from_str::<Value>(raw).unwrap_or(Value::Null);
                let kind = fields.get("type").and_then(Value::as_str).unwrap_or("none").to_owned();
                self.server.metrics.count_by("sqld_ws_requests_total", "Hrana WebSocket requests, by type.", "type", request_label(&kind), 1);
                Next::Send(match self.request(&kind, &fields, raw, access).await {
                    Ok(response) => json!({ "type": "response_ok", "request_id": id, "response": response }),
                    Err(e) => json!({ "type": "response_error", "request_id": id, "error": e }),
                })
            }
            _ => Next::Close(None, close(close_code::PROTOCOL, "a message of unknown type")),
        }
    }

    /// The first `hello` authenticates the socket; a later one (Hrana 2 and 3) replaces the
    /// token. A refused one ends the socket.
    fn hello(&mut self, jwt: Option<&Value>) -> Next {
        if self.access.is_some() && self.version < Version::Hrana2 {
            return Next::Close(None, close(close_code::PROTOCOL, "Hrana 1 allows one hello"));
        }
        let jwt = match jwt {
            None | Some(Value::Null) => None,
            Some(Value::String(jwt)) => Some(jwt.as_str()),
            Some(_) => return Next::Close(None, close(close_code::PROTOCOL, "hello's jwt must be a string or null")),
        };
        let server = &self.server;
        let key = server.hrana.store().jwt_key(&server.ns);
        match server.auth.check(Credential::Jwt(jwt), &server.ns, key.as_deref()) {
            Ok(access) => {
                self.access = Some(access);
                Next::Send(json!({ "type": "hello_ok" }))
            }
            Err(e) => {
                self.access = None;
                let answer = json!({ "type": "hello_error", "error": auth_error(&e) });
                Next::Close(Some(answer), close(close_code::POLICY, "authentication failed"))
            }
        }
    }

    /// Runs one request: `request` is its JSON, `raw` its text (values such as 64-bit integers
    /// are read from the text, as Hrana's types want them).
    async fn request(&mut self, kind: &str, request: &Value, raw: &str, access: Access) -> Result<Value, Value> {
        let needs = match kind {
            "open_stream" | "close_stream" | "execute" | "batch" => Version::Hrana1,
            "sequence" | "describe" | "store_sql" | "close_sql" => Version::Hrana2,
            "open_cursor" | "fetch_cursor" | "close_cursor" | "get_autocommit" => Version::Hrana3,
            _ => return Err(error(format!("unknown request type {kind:?}"), "PROTO_ERROR")),
        };
        if self.version < needs {
            return Err(error(format!("{kind} needs Hrana {} or later", needs as u8), "PROTO_ERROR"));
        }
        let field = |name: &str| request.get(name).and_then(Value::as_i64).and_then(|v| i32::try_from(v).ok());
        let id = |name: &str| field(name).ok_or_else(|| error(format!("{kind} needs a 32-bit {name}"), "PROTO_ERROR"));
        match kind {
            "open_stream" => self.open_stream(id("stream_id")?).await.map(|()| json!({ "type": "open_stream" })),
            "close_stream" => {
                self.close_stream(id("stream_id")?);
                Ok(json!({ "type": "close_stream" }))
            }
            "store_sql" => {
                let sql = request.get("sql").and_then(Value::as_str).ok_or_else(|| error("store_sql needs sql", "PROTO_ERROR"))?;
                self.sqls.store(id("sql_id")?, sql.to_owned()).map_err(|e| stmt_error(&e))?;
                Ok(json!({ "type": "store_sql" }))
            }
            "close_sql" => {
                self.sqls.close(id("sql_id")?);
                Ok(json!({ "type": "close_sql" }))
            }
            "open_cursor" => {
                let (stream_id, cursor_id) = (id("stream_id")?, id("cursor_id")?);
                let OpenCursor { batch } = parse(raw)?;
                self.open_cursor(stream_id, cursor_id, batch, access).await.map(|()| json!({ "type": "open_cursor" }))
            }
            "fetch_cursor" => {
                let max = request.get("max_count").and_then(Value::as_u64).ok_or_else(|| error("fetch_cursor needs max_count", "PROTO_ERROR"))?;
                let cursor = self.cursors.get_mut(&id("cursor_id")?).ok_or_else(|| error("no such cursor", "CURSOR_NOT_FOUND"))?;
                let entries: Vec<CursorEntry> = cursor.entries.drain(..(max as usize).min(cursor.entries.len())).collect();
                let entries: Vec<JsonCursorEntry<'_>> = entries.iter().map(JsonCursorEntry).collect();
                Ok(json!({ "type": "fetch_cursor", "entries": entries, "done": cursor.entries.is_empty() }))
            }
            "close_cursor" => {
                self.cursors.remove(&id("cursor_id")?);
                Ok(json!({ "type": "close_cursor" }))
            }
            _ => {
                // execute, batch, sequence, describe, get_autocommit: a stream request as HTTP
                // pipelines carry it, with the socket's stored SQL put in.
                let stream_id = id("stream_id")?;
                let mut request: StreamRequest = parse(raw)?;
                resolve_stored_sql(&mut request, &self.sqls).map_err(|e| stmt_error(&e))?;
                let (result, _budget) = self.on_stream(stream_id, access, move |stream, budget| stream.handle(&request, budget)).await?;
                match result {
                    StreamResult::Ok { response } => Ok(serde_json::to_value(response).unwrap_or(Value::Null)),
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
        let open = self.streams.values().filter(|s| matches!(s, Slot::Open(..))).count();
        if open >= self.server.limits.max_streams {
            self.streams.insert(stream_id, Slot::Failed);
            self.server.metrics.hits.hit(crate::limit_hits::Limit::StreamsPerConnection, format_args!("namespace {}: a WebSocket", self.server.ns));
            return Err(error(format!("at most {} streams may be open on one socket", self.server.limits.max_streams), "STREAMS_EXHAUSTED"));
        }
        match self.server.hrana.open_held(&self.server.ns).await {
            Ok((stream, held)) => {
                self.streams.insert(stream_id, Slot::Open(stream, held));
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
        if let Some(Slot::Open(stream, held)) = self.streams.remove(&stream_id) {
            self.server.metrics.gauge_add("sqld_ws_streams", -1);
            drop_off_runtime(vec![stream]);
            drop(held);
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
        self.cursors.insert(cursor_id, Cursor { entries: entries.into(), _budget: budget });
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
            Some(Slot::Open(stream, held)) => (stream, held),
            Some(other) => {
                let why = match other {
                    Slot::Expired => error("the stream's transaction held the write lock past its time limit and was rolled back", "TRANSACTION_TIMEOUT"),
                    _ => error(format!("stream {stream_id} failed to open"), "STREAM_NOT_FOUND"),
                };
                self.streams.insert(stream_id, other);
                return Err(why);
            }
            None => return Err(error(format!("no stream {stream_id} is open"), "STREAM_NOT_FOUND")),
        };
        match self.server.hrana.run_held(stream, access, None, f).await {
            Ok((stream, result, budget)) => {
                self.streams.insert(stream_id, Slot::Open(stream, held));
                Ok((result, budget))
            }
            Err(e) => {
                self.streams.insert(stream_id, Slot::Failed);
                self.server.metrics.gauge_add("sqld_ws_streams", -1);
                Err(request_error(&e))
            }
        }
    }

    /// Rolls back (and drops) the streams whose transaction held the write lock past its
    /// time limit while the client said nothing, so that other writers proceed.
    fn expire_transactions(&mut self) {
        let expired: Vec<i32> = self.streams.iter().filter(|(_, s)| matches!(s, Slot::Open(stream, _) if stream.transaction_expired())).map(|(id, _)| *id).collect();
        for id in expired {
            self.close_stream(id);
            self.streams.insert(id, Slot::Expired);
            self.server.metrics.hits.hit(
                crate::limit_hits::Limit::TransactionTimeout,
                format_args!("namespace {}: an idle WebSocket transaction held the write lock; rolled back", self.server.ns),
            );
        }
    }

    /// The socket ended: every stream is closed (its transaction rolled back) before the
    /// socket gives its place back, so a server stopping finds none still open.
    async fn close_everything(&mut self) {
        let mut streams = Vec::new();
        for (_, slot) in self.streams.drain() {
            if let Slot::Open(stream, held) = slot {
                streams.push((stream, held));
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

/// How long a socket closed by the server waits for the client's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

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

fn parse<'a, T: serde::Deserialize<'a>>(raw: &'a str) -> Result<T, Value> {
    serde_json::from_str(raw).map_err(|e| error(format!("a malformed request: {e}"), "PROTO_ERROR"))
}

/// A client message as far as the socket reads it; the request's own text is kept.
#[derive(serde::Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type")]
    kind: Option<String>,
    request_id: Option<Value>,
    jwt: Option<Value>,
    #[serde(borrow)]
    request: Option<&'a RawValue>,
}

#[derive(serde::Deserialize)]
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
