//! One socket's session: its hello, its streams, stored SQL and cursors, and the loop that
//! reads a message, answers it, and reads the next.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::SinkExt;
use libsql_hrana::proto::{Batch, BatchStreamReq, CursorEntry, Error, StreamRequest, StreamResult};
use tokio::time::{sleep_until, timeout, Instant};

use super::messages::{answer_message, read_json, read_protobuf, server_message, Answer, ClientMsg, Request, ServerMsg};
use super::{auth_error, close, close_code, error, Encoding, Socket, Version};
use crate::auth::{Access, Credential};
use crate::hrana::budget::ResponseBudget;
use crate::hrana::stmt::SqlStore;
use crate::hrana::{cursor_entries, drop_off_runtime, Held, RequestError, StmtError, Stream};
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
    Open {
        stream: Stream,
        _held: Held,
        used: Instant,
    },
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

/// What to do after a message.
enum Next {
    /// Send this; the budget its answer holds goes once it is sent.
    Send(Message, Option<ResponseBudget>),
    /// Send this (if anything), then close with the frame.
    Close(Option<Message>, Message),
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
                Some(Ok(_)) => Next::Close(
                    None,
                    close(close_code::UNSUPPORTED, "text messages are JSON (hrana1-3), binary ones protobuf (hrana3-protobuf)"),
                ),
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
                    Ok(answer) => {
                        let (message, budget) = answer_message(self.encoding, id, answer);
                        Next::Send(message, budget)
                    }
                    Err(e) => Next::Send(server_message(self.encoding, ServerMsg::ResponseError(id, e)), None),
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
                Next::Send(server_message(self.encoding, ServerMsg::HelloOk), None)
            }
            Err(e) => {
                self.hello = None;
                Next::Close(
                    Some(server_message(self.encoding, ServerMsg::HelloError(e))),
                    close(close_code::POLICY, "authentication failed"),
                )
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
                let cursor = self
                    .cursors
                    .get_mut(&cursor_id)
                    .ok_or_else(|| error("no such cursor (closed, or left idle too long)", "CURSOR_NOT_FOUND"))?;
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
            return Err(error(
                format!("at most {} streams may be open on one socket", self.server.limits.max_streams),
                "STREAMS_EXHAUSTED",
            ));
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
            return Err(error(
                format!("at most {} cursors may be open on one socket", self.server.limits.max_cursors),
                "CURSORS_EXHAUSTED",
            ));
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
