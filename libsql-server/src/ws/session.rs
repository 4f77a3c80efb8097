//! One socket's session: its hello, its stored SQL, and the loop that reads a message and
//! hands it to the stream it names (each stream a task of its own, see `lane`) while the
//! answers of earlier ones are sent back.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket};
use futures::SinkExt;
use libsql_hrana::proto::{Error, StreamRequest};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{sleep_until, timeout, Instant};

use super::lane::{self, Context, Job, Reply};
use super::messages::{answer_message, read_json, read_protobuf, server_message, Answer, ClientMsg, Request, ServerMsg};
use super::{auth_error, close, close_code, error, Encoding, Socket, Version};
use crate::auth::{Access, Credential};
use crate::hrana::stmt::SqlStore;
use crate::hrana::StmtError;
use crate::limit_hits::Limit;

/// How long a socket closed by the server waits for the client's close frame.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Requests a socket may have running or answered-but-unsent at once; past it the socket is
/// not read until answers go out (back-pressure through TCP).
const MAX_IN_FLIGHT: usize = 64;

pub struct Session {
    server: Socket,
    version: Version,
    encoding: Encoding,
    /// The token of the last `hello` (checked again at every request: it may expire); `None`
    /// inside means the hello carried none.
    hello: Option<Option<String>>,
    /// The open streams, each a task taking its requests in order.
    lanes: HashMap<i32, mpsc::UnboundedSender<Job>>,
    /// Which stream each open cursor belongs to.
    cursors: HashMap<i32, i32>,
    /// Stored SQL belongs to the socket (Hrana 2), shared by its streams.
    sqls: SqlStore,
    replies: (mpsc::UnboundedSender<Reply>, mpsc::UnboundedReceiver<Reply>),
    /// Requests handed to lanes whose answers have not been sent yet.
    in_flight: usize,
    tasks: JoinSet<()>,
    /// Turns true when the socket ends: its lanes stop (their statements are interrupted).
    lanes_stop: watch::Sender<bool>,
}

/// What to do after a message.
enum Next {
    /// Send this; the budget its answer holds goes once it is sent.
    Send(Message, Option<crate::hrana::budget::ResponseBudget>),
    /// Send this (if anything), then close with the frame.
    Close(Option<Message>, Message),
}

impl Session {
    pub fn new(server: Socket, version: Version, encoding: Encoding) -> Self {
        Session {
            server,
            version,
            encoding,
            hello: None,
            lanes: HashMap::new(),
            cursors: HashMap::new(),
            sqls: SqlStore::default(),
            replies: mpsc::unbounded_channel(),
            in_flight: 0,
            tasks: JoinSet::new(),
            lanes_stop: watch::channel(false).0,
        }
    }

    pub async fn run(mut self, mut socket: WebSocket) {
        let within = self.server.limits.send_timeout;
        // Until its hello, a socket gets as long as an HTTP client for its request head.
        let mut deadline = Instant::now() + within;
        let mut stop = self.server.stop.clone();
        loop {
            let reading = self.in_flight < MAX_IN_FLIGHT;
            let next = tokio::select! {
                message = socket.recv(), if reading => {
                    let next = match message {
                        None | Some(Err(_)) => break,
                        Some(Ok(Message::Close(_))) => {
                            // tungstenite queued the reply to the client's close: send it.
                            let _ = timeout(within, socket.flush()).await;
                            break;
                        }
                        // Pings are answered by the socket itself; they do not keep it alive.
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Text(text))) if self.encoding == Encoding::Json => match read_json(&text, self.server.limits.max_values) {
                            Ok(message) => self.handle(message),
                            Err(why) => Some(Next::Close(None, close(close_code::PROTOCOL, why))),
                        },
                        Some(Ok(Message::Binary(bytes))) if self.encoding == Encoding::Protobuf => match read_protobuf(&bytes, self.server.limits.max_values) {
                            Ok(message) => self.handle(message),
                            Err(why) => Some(Next::Close(None, close(close_code::PROTOCOL, why))),
                        },
                        Some(Ok(_)) => Some(Next::Close(
                            None,
                            close(close_code::UNSUPPORTED, "text messages are JSON (hrana1-3), binary ones protobuf (hrana3-protobuf)"),
                        )),
                    };
                    if self.hello.is_some() {
                        deadline = Instant::now() + self.server.limits.idle_timeout;
                    }
                    next
                }
                Some((id, result)) = self.replies.1.recv() => {
                    self.in_flight -= 1;
                    Some(self.answer(id, result))
                }
                _ = stop.changed() => {
                    let _ = send(within, &mut socket, close(close_code::GOING_AWAY, "the server is shutting down")).await;
                    break;
                }
                _ = sleep_until(deadline), if self.in_flight == 0 => {
                    let why = if self.hello.is_none() { "no hello" } else { "idle" };
                    let _ = send(within, &mut socket, close(close_code::NORMAL, why)).await;
                    break;
                }
            };
            let sent = match next {
                None => true,
                Some(Next::Send(answer, budget)) => {
                    let sent = send(within, &mut socket, answer).await;
                    drop(budget);
                    sent
                }
                Some(Next::Close(answer, frame)) => {
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
        // The socket ended: its lanes stop and roll their streams back before it gives its
        // place back, so a server stopping finds none still open.
        let _ = self.lanes_stop.send(true);
        self.lanes.clear();
        while self.tasks.join_next().await.is_some() {}
    }

    /// A message: answered at once (`Some`), or handed to a stream's lane (`None`: its answer
    /// comes back through `replies`).
    fn handle(&mut self, message: ClientMsg) -> Option<Next> {
        match message {
            ClientMsg::Hello(jwt) => Some(self.hello(jwt)),
            ClientMsg::Request(id, request) => {
                let Some(token) = self.hello.clone() else {
                    return Some(Next::Close(None, close(close_code::PROTOCOL, "a request before hello")));
                };
                let handed = match (self.authorized(token.as_deref()), request) {
                    (Ok(access), Ok(request)) => self.request(id, request, access),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
                match handed {
                    Ok(None) => {
                        self.in_flight += 1;
                        None
                    }
                    Ok(Some(answer)) => Some(self.answer(id, Ok(answer))),
                    Err(e) => Some(self.answer(id, Err(e))),
                }
            }
        }
    }

    fn answer(&self, id: i32, result: Result<Answer, Error>) -> Next {
        match result {
            Ok(answer) => {
                let (message, budget) = answer_message(self.encoding, id, answer);
                Next::Send(message, budget)
            }
            Err(e) => Next::Send(server_message(self.encoding, ServerMsg::ResponseError(id, e)), None),
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

    /// Answers a request at once (`Some`), or hands it to its stream's lane (`None`).
    fn request(&mut self, id: i32, request: Request, access: Access) -> Result<Option<Answer>, Error> {
        let kind = request.kind();
        self.server.metrics.count_by("sqld_ws_requests_total", "Hrana WebSocket requests, by type.", "type", kind, 1);
        if self.version < request.needs() {
            return Err(error(format!("{kind} needs Hrana {} or later", request.needs() as u8), "PROTO_ERROR"));
        }
        let lane = |lanes: &HashMap<i32, mpsc::UnboundedSender<Job>>, stream_id: i32| {
            lanes.get(&stream_id).cloned().ok_or_else(|| error(format!("no stream {stream_id} is open"), "STREAM_NOT_FOUND"))
        };
        let handed = |sender: mpsc::UnboundedSender<Job>, job: Job| {
            sender.send(job).map(|()| None).map_err(|_| error("the stream has ended", "STREAM_NOT_FOUND"))
        };
        match request {
            Request::OpenStream(stream_id) => self.open_stream(id, stream_id).map(|()| None),
            Request::CloseStream(stream_id) => match self.lanes.remove(&stream_id) {
                Some(sender) => {
                    self.cursors.retain(|_, owner| *owner != stream_id);
                    handed(sender, Job::Close { id })
                }
                None => Ok(Some(Answer::Done(kind))),
            },
            Request::StoreSql(sql_id, sql) => {
                self.sqls.store(sql_id, sql).map_err(|e| e.to_proto())?;
                Ok(Some(Answer::Done(kind)))
            }
            Request::CloseSql(sql_id) => {
                self.sqls.close(sql_id);
                Ok(Some(Answer::Done(kind)))
            }
            Request::Stream(stream_id, mut request) => {
                resolve_stored_sql(&mut request, &self.sqls).map_err(|e| e.to_proto())?;
                handed(lane(&self.lanes, stream_id)?, Job::Run { id, request, access })
            }
            Request::OpenCursor { stream_id, cursor_id, batch } => {
                if self.cursors.contains_key(&cursor_id) {
                    return Err(error(format!("cursor {cursor_id} is already open"), "PROTO_ERROR"));
                }
                let max = self.server.limits.max_cursors;
                if self.cursors.len() >= max {
                    return Err(error(format!("at most {max} cursors may be open on one socket"), "CURSORS_EXHAUSTED"));
                }
                let mut request = StreamRequest::Batch(libsql_hrana::proto::BatchStreamReq { batch });
                resolve_stored_sql(&mut request, &self.sqls).map_err(|e| e.to_proto())?;
                let StreamRequest::Batch(libsql_hrana::proto::BatchStreamReq { batch }) = request else {
                    unreachable!("a batch stays a batch")
                };
                let sender = lane(&self.lanes, stream_id)?;
                self.cursors.insert(cursor_id, stream_id);
                handed(sender, Job::OpenCursor { id, cursor_id, batch, access })
            }
            Request::FetchCursor { cursor_id, max_count } => match self.cursors.get(&cursor_id).and_then(|s| self.lanes.get(s)) {
                Some(sender) => handed(sender.clone(), Job::FetchCursor { id, cursor_id, max_count }),
                None => Err(error("no such cursor (closed, or left idle too long)", "CURSOR_NOT_FOUND")),
            },
            Request::CloseCursor(cursor_id) => match self.cursors.remove(&cursor_id).and_then(|s| self.lanes.get(&s)) {
                Some(sender) => handed(sender.clone(), Job::CloseCursor { id, cursor_id }),
                None => Ok(Some(Answer::Done(kind))),
            },
        }
    }

    /// Starts the lane of a new stream; it answers the `open_stream` once the stream is open.
    fn open_stream(&mut self, id: i32, stream_id: i32) -> Result<(), Error> {
        if self.lanes.contains_key(&stream_id) {
            return Err(error(format!("stream {stream_id} is already open"), "PROTO_ERROR"));
        }
        let max = self.server.limits.max_streams;
        if self.lanes.len() >= max {
            self.server.metrics.hits.hit(Limit::StreamsPerConnection, format_args!("namespace {}: a WebSocket", self.server.ns));
            return Err(error(format!("at most {max} streams may be open on one socket"), "STREAMS_EXHAUSTED"));
        }
        let (sender, jobs) = mpsc::unbounded_channel();
        let context = Context {
            hrana: self.server.hrana.clone(),
            metrics: self.server.metrics.clone(),
            ns: self.server.ns.clone(),
            limits: self.server.limits,
            running: self.server.running.clone(),
            queue_wait: self.server.queue_wait,
        };
        self.tasks.spawn(lane::run(context, id, jobs, self.replies.0.clone(), self.lanes_stop.subscribe()));
        self.lanes.insert(stream_id, sender);
        Ok(())
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
