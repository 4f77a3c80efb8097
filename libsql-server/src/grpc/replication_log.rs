//! `wal_log.ReplicationLog`: `Hello`, `BatchLogEntries`, `LogEntries` and `Snapshot`, served
//! from the namespace's log as it stands (see `replication::feed`).
//!
//! A `Hello` answers a session token made of this process's session and the log's log_id, and
//! every later call must carry the token of the log it is served from. A restart (a new
//! session) or a rebuilt log (a new log_id: reset-replication, a rebuild at recovery) makes the
//! token stale: the replica is told `NO_HELLO`, its next `Hello` gives it the new log_id, and a
//! replica whose log_id differs starts over from frame 0, which is the new log's full image.
//! So frames of one log are never applied on top of another's, even when a rebuild lands
//! between a replica's `Hello` and its next pull.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use libsql_replication::rpc::replication::log_offset::WalFlavor;
use libsql_replication::rpc::replication::replication_log_server::ReplicationLog;
use libsql_replication::rpc::replication::{
    BoxStream, Frame, Frames as RpcFrames, HelloRequest, HelloResponse, LogOffset, SESSION_TOKEN_KEY,
};
use tokio::sync::{watch, OwnedSemaphorePermit};
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::admit::caller;
use super::status::{need_snapshot, no_hello, StatusOf};
use super::{pumped, GrpcState};
use crate::blocking;
use crate::namespace::{Namespace, NamespaceName};
use crate::replication::feed::{FeedView, Frames};
use crate::replication::ReplicationLogger;

/// Most frames one `BatchLogEntries` answer holds (about 2 MB: under the 4 MB that gRPC
/// clients accept by default).
const MAX_BATCH_FRAMES: usize = 512;

/// Frames read from the log at once for a stream.
const STREAM_CHUNK_FRAMES: u64 = 64;

pub struct ReplicationLogService {
    state: Arc<GrpcState>,
}

impl ReplicationLogService {
    pub fn new(state: Arc<GrpcState>) -> Self {
        ReplicationLogService { state }
    }

    /// The token a call carries, if it carries one that parses.
    fn given_token(metadata: &MetadataMap) -> Option<Uuid> {
        metadata.get(SESSION_TOKEN_KEY)?.to_str().ok()?.parse().ok()
    }

    /// The call's namespace (admitted from its headers), loaded.
    async fn namespace<T>(&self, request: &Request<T>) -> Result<(NamespaceName, Arc<Namespace>), Status> {
        let caller = caller(request)?;
        let ns = self.state.hrana.store().get(&caller.ns).await.map_err(|e| e.status())?;
        Ok((caller.ns, ns))
    }

    /// The log as it stands, and the answer to `read` from it, if the call's session is this
    /// log's (else `NO_HELLO`). The log's lock is taken off the async workers: a commit holds
    /// it through its fsync.
    async fn read<T: Send + 'static>(
        &self,
        logger: &Arc<ReplicationLogger>,
        given: Option<Uuid>,
        read: impl FnOnce(&FeedView) -> T + Send + 'static,
    ) -> Result<(FeedView, T), Status> {
        let logger = logger.clone();
        let session = self.state.session;
        let (view, answer) = blocking::run(move || {
            let view = logger.feed_view();
            let current = given == Some(session_token(session, view.log_id()));
            let answer = current.then(|| read(&view));
            (view, answer)
        })
        .await
        .map_err(|e| e.status())?;
        match answer {
            Some(answer) => Ok((view, answer)),
            None => Err(no_hello()),
        }
    }

    fn count_frames(&self, ns: &NamespaceName, frames: usize) {
        self.state.metrics.count_ns(
            "sqld_replication_frames_served_total",
            "Frames served to gRPC replicas, by namespace.",
            ns,
            frames as u64,
        );
    }
}

/// The session token of a log: this process's session and the log's log_id.
fn session_token(session: Uuid, log_id: Uuid) -> Uuid {
    Uuid::from_u128(session.as_u128() ^ log_id.as_u128())
}

/// Only SQLite's frame layout is served.
fn check_flavor(offset: &LogOffset) -> Result<(), Status> {
    match offset.wal_flavor.map(WalFlavor::try_from) {
        None | Some(Ok(WalFlavor::Sqlite)) => Ok(()),
        _ => Err(Status::invalid_argument("only SQLite frames (wal_flavor Sqlite) are served")),
    }
}

fn rpc_frame(data: Bytes) -> Frame {
    Frame { data, timestamp: None, durable_frame_no: None }
}

#[tonic::async_trait]
impl ReplicationLog for ReplicationLogService {
    type LogEntriesStream = BoxStream<'static, Result<Frame, Status>>;
    type SnapshotStream = BoxStream<'static, Result<Frame, Status>>;

    async fn hello(&self, request: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        let (name, ns) = self.namespace(&request).await?;
        let _place = self.state.place(&name, "Hello").await?;
        let logger = ns.log().map_err(|e| e.status())?.clone();
        let view = blocking::run(move || logger.feed_view()).await.map_err(|e| e.status())?;
        let log_id = view.log_id();
        // Not used by replicas beyond display: one per generation of this log.
        let generation_id = Uuid::from_u64_pair(log_id.as_u64_pair().0, view.generation());
        Ok(Response::new(HelloResponse {
            generation_id: generation_id.hyphenated().to_string(),
            generation_start_index: view.start_frame_no(),
            log_id: log_id.hyphenated().to_string(),
            session_token: Bytes::from(session_token(self.state.session, log_id).hyphenated().to_string()),
            current_replication_index: view.last_frame_no(),
            config: Some((*ns.db().config()).clone()),
        }))
    }

    async fn batch_log_entries(&self, request: Request<LogOffset>) -> Result<Response<RpcFrames>, Status> {
        let (name, ns) = self.namespace(&request).await?;
        let _place = self.state.place(&name, "BatchLogEntries").await?;
        let given = Self::given_token(request.metadata());
        let offset = request.into_inner();
        check_flavor(&offset)?;
        let next = offset.next_offset;
        let (_, frames) = self.read(ns.log().map_err(|e| e.status())?, given, move |view| view.frames_from(next, MAX_BATCH_FRAMES)).await?;
        match frames.map_err(|e| e.status())? {
            Frames::Frames(frames) => {
                self.count_frames(&name, frames.len());
                Ok(Response::new(RpcFrames { frames: frames.into_iter().map(rpc_frame).collect() }))
            }
            Frames::UpToDate => Ok(Response::new(RpcFrames { frames: Vec::new() })),
            Frames::NeedSnapshot => Err(need_snapshot()),
        }
    }

    async fn log_entries(&self, request: Request<LogOffset>) -> Result<Response<Self::LogEntriesStream>, Status> {
        let (name, ns) = self.namespace(&request).await?;
        let place = self.state.stream_place(&name, "LogEntries")?;
        let given = Self::given_token(request.metadata());
        let offset = request.into_inner();
        check_flavor(&offset)?;
        let logger = ns.log().map_err(|e| e.status())?.clone();
        let mut moved = logger.watch();
        moved.borrow_and_update();
        let next = offset.next_offset;
        let (view, frames) = self.read(&logger, given, move |view| view.frames_from(next, STREAM_CHUNK_FRAMES as usize)).await?;
        let first = match frames.map_err(|e| e.status())? {
            Frames::NeedSnapshot => return Err(need_snapshot()),
            Frames::UpToDate => VecDeque::new(),
            Frames::Frames(frames) => VecDeque::from(frames),
        };
        let follow = Follow {
            service: ReplicationLogService { state: self.state.clone() },
            name,
            logger,
            log_id: view.log_id(),
            given,
            next: next + first.len() as u64,
            pending: first,
            moved,
            stop: self.state.stop.clone(),
            idle: self.state.follow_idle,
            done: false,
            _place: place,
        };
        Ok(Response::new(pumped(futures::stream::unfold(follow, Follow::next_frame), self.state.stall)))
    }

    async fn snapshot(&self, request: Request<LogOffset>) -> Result<Response<Self::SnapshotStream>, Status> {
        let (name, ns) = self.namespace(&request).await?;
        let place = self.state.stream_place(&name, "Snapshot")?;
        let given = Self::given_token(request.metadata());
        check_flavor(request.get_ref())?;
        let (view, first) = self.read(ns.log().map_err(|e| e.status())?, given, |view| view.snapshot_frames(0, STREAM_CHUNK_FRAMES)).await?;
        let first = first.map_err(|e| e.status())?;
        self.state.metrics.count_ns(
            "sqld_replication_snapshots_served_total",
            "Snapshots served to gRPC replicas, by namespace.",
            &name,
            1,
        );
        self.count_frames(&name, view.snapshot_len() as usize);
        let snapshot = SnapshotStream { view, done: first.len() as u64, pending: VecDeque::from(first), _place: place };
        Ok(Response::new(pumped(futures::stream::unfold(snapshot, SnapshotStream::next_frame), self.state.stall)))
    }
}

/// A `LogEntries` stream: the log's frames from an offset on, then each new commit's as it
/// lands. It ends (cleanly) after `idle` with nothing new, so it never holds a connection
/// idle past its timeout (replicas simply ask again), when the server stops, and with
/// `NO_HELLO` once the log is rebuilt or `NEED_SNAPSHOT` once compaction moved past it.
struct Follow {
    service: ReplicationLogService,
    name: NamespaceName,
    logger: Arc<ReplicationLogger>,
    log_id: Uuid,
    given: Option<Uuid>,
    next: u64,
    pending: VecDeque<Bytes>,
    moved: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    idle: Duration,
    done: bool,
    _place: OwnedSemaphorePermit,
}

impl Follow {
    async fn next_frame(mut self) -> Option<(Result<Frame, Status>, Self)> {
        loop {
            if let Some(frame) = self.pending.pop_front() {
                return Some((Ok(rpc_frame(frame)), self));
            }
            if self.done {
                return None;
            }
            // Seen before reading, so a commit landing after the read wakes the wait below.
            self.moved.borrow_and_update();
            let next = self.next;
            let read = self.service.read(&self.logger, self.given, move |view| view.frames_from(next, STREAM_CHUNK_FRAMES as usize)).await;
            let frames = match read {
                Ok((view, _)) if view.log_id() != self.log_id => Err(no_hello()),
                Ok((_, frames)) => frames.map_err(|e| e.status()),
                Err(status) => Err(status),
            };
            match frames {
                Ok(Frames::Frames(frames)) => {
                    self.service.count_frames(&self.name, frames.len());
                    self.next += frames.len() as u64;
                    self.pending.extend(frames);
                }
                Ok(Frames::UpToDate) => {
                    tokio::select! {
                        changed = self.moved.changed() => if changed.is_err() { return None },
                        _ = tokio::time::sleep(self.idle) => return None,
                        _ = self.stop.changed() => return None,
                    }
                }
                Ok(Frames::NeedSnapshot) => {
                    self.done = true;
                    return Some((Err(need_snapshot()), self));
                }
                Err(status) => {
                    self.done = true;
                    return Some((Err(status), self));
                }
            }
        }
    }
}

/// A `Snapshot` stream: the log's opening image, newest frame first, read a chunk at a time.
struct SnapshotStream {
    view: FeedView,
    done: u64,
    pending: VecDeque<Bytes>,
    _place: OwnedSemaphorePermit,
}

impl SnapshotStream {
    async fn next_frame(mut self) -> Option<(Result<Frame, Status>, Self)> {
        if self.pending.is_empty() && self.done < self.view.snapshot_len() {
            let (view, done) = (self.view.clone(), self.done);
            match blocking::run(move || view.snapshot_frames(done, STREAM_CHUNK_FRAMES)).await {
                Ok(Ok(frames)) => {
                    self.done += frames.len() as u64;
                    self.pending.extend(frames);
                }
                Ok(Err(e)) => {
                    self.done = u64::MAX;
                    return Some((Err(e.status()), self));
                }
                Err(e) => {
                    self.done = u64::MAX;
                    return Some((Err(e.status()), self));
                }
            }
        }
        let frame = self.pending.pop_front()?;
        Some((Ok(rpc_frame(frame)), self))
    }
}
