//! One stream of a socket, as a task of its own: its requests run in order, while the
//! socket's other streams run theirs at the same time (a transaction on one stream and a
//! write on another, each waiting for what the other holds, would otherwise wait out the
//! write lock's timeout). The stream, its cursors and its place in the stream bounds live
//! here and go with the task.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use libsql_hrana::proto::{Batch, CursorEntry, Error, StreamRequest, StreamResult};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use super::error;
use super::messages::Answer;
use super::SocketLimits;
use crate::auth::Access;
use crate::hrana::budget::ResponseBudget;
use crate::hrana::{cursor_entries, Held, Hrana, RequestError, Stream};
use crate::limit_hits::{take_place, Limit};
use crate::metrics::Metrics;
use crate::namespace::NamespaceName;

/// How often a lane looks for its stream and cursors left idle too long.
const EXPIRY_CHECK: Duration = Duration::from_millis(500);

/// What a lane is asked to do; each job carries the request id its answer goes back with.
pub(super) enum Job {
    Run {
        id: i32,
        request: StreamRequest,
        access: Access,
    },
    OpenCursor {
        id: i32,
        cursor_id: i32,
        batch: Batch,
        access: Access,
    },
    FetchCursor {
        id: i32,
        cursor_id: i32,
        max_count: u32,
    },
    CloseCursor {
        id: i32,
        cursor_id: i32,
    },
    /// The stream is closed (rolled back if in a transaction); the lane ends.
    Close {
        id: i32,
    },
}

/// An answer on its way back to the socket.
pub(super) type Reply = (i32, Result<Answer, Error>);

/// What every lane of a socket shares.
#[derive(Clone)]
pub(super) struct Context {
    pub hrana: Hrana,
    pub metrics: Arc<Metrics>,
    pub ns: NamespaceName,
    pub limits: SocketLimits,
    /// The places of the requests running at once, shared with HTTP.
    pub running: Arc<Semaphore>,
    pub queue_wait: Duration,
}

/// A cursor's entries, fetched a few at a time, with the budget their size holds.
struct Cursor {
    entries: VecDeque<CursorEntry>,
    used: Instant,
    _budget: ResponseBudget,
}

enum State {
    Open(Stream, Held),
    /// `open_stream` failed: every request fails until the stream is closed.
    Failed,
    /// Rolled back: it sat idle too long, or its transaction held the write lock too long.
    Expired,
}

/// Runs one stream: opens it, answers `open_id`, then its jobs in order until it is closed,
/// the socket ends (`jobs` closes) or `stop` turns true. Whatever ends it, the stream is
/// rolled back off the async workers before the task ends.
pub(super) async fn run(
    ctx: Context,
    open_id: i32,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    replies: mpsc::UnboundedSender<Reply>,
    mut stop: watch::Receiver<bool>,
) {
    let mut state = match ctx.hrana.open_held(&ctx.ns).await {
        Ok((stream, held)) => {
            ctx.metrics.gauge_add("sqld_ws_streams", 1);
            let _ = replies.send((open_id, Ok(Answer::Done("open_stream"))));
            State::Open(stream, held)
        }
        Err(e) => {
            let _ = replies.send((open_id, Err(request_error(&e))));
            State::Failed
        }
    };
    let mut cursors: HashMap<i32, Cursor> = HashMap::new();
    let mut used = Instant::now();
    let mut expiry = tokio::time::interval(EXPIRY_CHECK);
    loop {
        let job = tokio::select! {
            biased;
            _ = stop.changed() => break,
            job = jobs.recv() => match job {
                Some(job) => job,
                None => break,
            },
            _ = expiry.tick() => {
                expire(&ctx, &mut state, &mut cursors, used).await;
                continue;
            }
        };
        used = Instant::now();
        if let Job::Close { id } = job {
            let _ = replies.send((id, Ok(Answer::Done("close_stream"))));
            break;
        }
        // A job is stopped if the socket stops (its statement is interrupted).
        let reply = tokio::select! {
            biased;
            _ = stop.changed() => break,
            reply = perform(&ctx, &mut state, &mut cursors, job) => reply,
        };
        if replies.send(reply).is_err() {
            break;
        }
    }
    close(&ctx, state).await;
}

async fn perform(ctx: &Context, state: &mut State, cursors: &mut HashMap<i32, Cursor>, job: Job) -> Reply {
    match job {
        Job::Run { id, request, access } => {
            let result = on_stream(ctx, state, access, move |stream, budget| stream.handle(&request, budget)).await;
            (
                id,
                result.and_then(|(result, budget)| match result {
                    StreamResult::Ok { response } => Ok(Answer::Stream(response, budget)),
                    StreamResult::Error { error } => Err(error),
                    StreamResult::None => Err(error("no answer", "INTERNAL")),
                }),
            )
        }
        Job::OpenCursor { id, cursor_id, batch, access } => {
            let result = on_stream(ctx, state, access, move |stream, budget| stream.run_batch(&batch, budget)).await;
            (
                id,
                result.map(|(result, budget)| {
                    let entries = match result {
                        Ok(result) => cursor_entries(result),
                        Err(e) => vec![CursorEntry::Error { error: e.to_proto() }],
                    };
                    cursors.insert(cursor_id, Cursor { entries: entries.into(), used: Instant::now(), _budget: budget });
                    Answer::Done("open_cursor")
                }),
            )
        }
        Job::FetchCursor { id, cursor_id, max_count } => {
            let Some(cursor) = cursors.get_mut(&cursor_id) else {
                return (id, Err(error("no such cursor (closed, or left idle too long)", "CURSOR_NOT_FOUND")));
            };
            cursor.used = Instant::now();
            let entries: Vec<CursorEntry> = cursor.entries.drain(..(max_count as usize).min(cursor.entries.len())).collect();
            (id, Ok(Answer::Fetched { entries, done: cursor.entries.is_empty() }))
        }
        Job::CloseCursor { id, cursor_id } => {
            cursors.remove(&cursor_id);
            (id, Ok(Answer::Done("close_cursor")))
        }
        Job::Close { id } => (id, Ok(Answer::Done("close_stream"))),
    }
}

/// Runs `f` on the open stream (on the blocking pool), then puts it back.
async fn on_stream<R: Send + 'static>(
    ctx: &Context,
    state: &mut State,
    access: Access,
    f: impl FnOnce(&mut Stream, &mut ResponseBudget) -> R + Send + 'static,
) -> Result<(R, ResponseBudget), Error> {
    match state {
        State::Open(..) => {}
        State::Failed => return Err(error("the stream failed to open", "STREAM_NOT_FOUND")),
        State::Expired => return Err(error("the stream was rolled back: it sat idle, or held the write lock, too long", "STREAM_EXPIRED")),
    }
    // A place among the requests running at once, as an HTTP request takes one; held with
    // the answer's budget until the answer is sent.
    let Some(place) = take_place(&ctx.running, ctx.queue_wait).await else {
        ctx.metrics.hits.hit(Limit::Requests, format_args!("namespace {}: a WebSocket request", ctx.ns));
        return Err(error("too many requests are running; retry later", "REQUESTS_EXHAUSTED"));
    };
    let State::Open(stream, held) = std::mem::replace(state, State::Failed) else { unreachable!("checked above") };
    match ctx.hrana.run_held(stream, access, Some(Box::new(place)), f).await {
        Ok((stream, result, budget)) => {
            *state = State::Open(stream, held);
            Ok((result, budget))
        }
        Err(e) => {
            ctx.metrics.gauge_add("sqld_ws_streams", -1);
            Err(request_error(&e))
        }
    }
}

/// Rolls the stream back if it was left idle past the stream expiry, or if its transaction
/// held the write lock past its time limit while the client said nothing; drops cursors left
/// unfetched as long (their answers hold the response bound).
async fn expire(ctx: &Context, state: &mut State, cursors: &mut HashMap<i32, Cursor>, used: Instant) {
    let expiry = ctx.limits.stream_expiry;
    cursors.retain(|_, cursor| cursor.used.elapsed() <= expiry);
    let State::Open(stream, _) = &*state else { return };
    let held_the_lock = stream.transaction_expired();
    if !held_the_lock && used.elapsed() <= expiry {
        return;
    }
    if held_the_lock {
        ctx.metrics.hits.hit(
            Limit::TransactionTimeout,
            format_args!("namespace {}: an idle WebSocket transaction held the write lock; rolled back", ctx.ns),
        );
    }
    let expired = std::mem::replace(state, State::Expired);
    close(ctx, expired).await;
}

/// Closes the stream (rolling back its transaction) on the blocking pool.
async fn close(ctx: &Context, state: State) {
    if let State::Open(stream, held) = state {
        let _ = crate::blocking::run(move || drop((stream, held))).await;
        ctx.metrics.gauge_add("sqld_ws_streams", -1);
    }
}

fn request_error(e: &RequestError) -> Error {
    error(e.to_string(), e.code())
}
