//! The client side of `wal_log.ReplicationLog`, as `libsql_replication`'s `Replicator` pulls
//! through it: `Hello`, then `LogEntries` streams (new commits as they land), and the
//! `Snapshot` when the primary says the log no longer reaches back to where this replica
//! stands. The replicated index is kept in `client_wal_index` beside the data file (the
//! libSQL server's replica layout), and published as it moves.

use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{Stream, StreamExt};
use libsql_replication::frame::FrameNo;
use libsql_replication::meta::WalIndexMeta;
use libsql_replication::replicator::{Error, ReplicatorClient};
use libsql_replication::rpc::replication::replication_log_client::ReplicationLogClient;
use libsql_replication::rpc::metadata::DatabaseConfig;
use libsql_replication::rpc::replication::{Frame, HelloRequest, LogOffset, NAMESPACE_METADATA_KEY, SESSION_TOKEN_KEY};
use tokio::sync::watch;
use tonic::metadata::{AsciiMetadataValue, BinaryMetadataValue};
use tonic::transport::Channel;

use crate::namespace::NamespaceName;

/// No frame received yet.
const NONE: u64 = u64::MAX;

/// A frame's header: frame_no, checksum (`u64` each), page number, size after a commit
/// (`u32` each; the size is 0 on frames that do not commit).
const FRAME_HEADER: usize = 24;

/// Where a replica stands, published for its readers and for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The frame_no of the last transaction applied here.
    pub applied: Option<FrameNo>,
    /// The primary's last frame_no as last heard: at the last hello, or the last commit frame
    /// received since.
    pub primary: Option<FrameNo>,
    /// A hello succeeded: `primary` is known (`None` then means the primary's log is empty).
    pub greeted: bool,
    /// The primary answered that the namespace does not exist.
    pub missing: bool,
    /// Since when the copy has been behind what it knows of the primary (`None`: caught up).
    pub behind_since: Option<std::time::Instant>,
    /// How many times the copy started over from another log (frame numbers restart then).
    pub restarts: u64,
    /// The last attempt to follow failed (the primary out of reach, or refusing), and no
    /// hello has succeeded since.
    pub failing: bool,
}

impl Progress {
    /// Whether the copy holds a state of the primary's log to read from (or the log is empty).
    pub fn ready(&self) -> bool {
        self.applied.is_some() || (self.greeted && self.primary.is_none())
    }

    /// Frames the copy is behind what it knows of the primary.
    pub fn lag_frames(&self) -> u64 {
        match (self.primary, self.applied) {
            (Some(primary), Some(applied)) => primary.saturating_sub(applied),
            (Some(primary), None) => primary + 1,
            (None, _) => 0,
        }
    }

    /// Seconds since the copy fell behind what it knows of the primary (0 when caught up).
    pub fn lag_seconds(&self) -> f64 {
        self.behind_since.map_or(0.0, |since| since.elapsed().as_secs_f64())
    }

    /// Notes a move of `applied` or `primary`: starts or ends the time behind.
    fn settle(&mut self) {
        if self.lag_frames() == 0 {
            self.behind_since = None;
        } else if self.behind_since.is_none() {
            self.behind_since = Some(std::time::Instant::now());
        }
    }
}

/// The namespace's configuration as the primary last gave it (at a hello).
pub type ConfigWatch = watch::Sender<Option<Arc<DatabaseConfig>>>;

pub struct PrimaryClient {
    client: ReplicationLogClient<Channel>,
    namespace: BinaryMetadataValue,
    authorization: Option<AsciiMetadataValue>,
    session: Option<AsciiMetadataValue>,
    meta: WalIndexMeta,
    /// The newest frame_no received (NONE if none), updated as frames stream in.
    received: Arc<AtomicU64>,
    progress: watch::Sender<Progress>,
    config: ConfigWatch,
}

pub type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, Error>> + Send + 'static>>;

impl PrimaryClient {
    /// A client of `channel` for `namespace`'s log, with the replicated index kept in `dir`.
    pub async fn new(
        channel: Channel,
        namespace: &NamespaceName,
        token: Option<&str>,
        dir: &Path,
        progress: watch::Sender<Progress>,
        config: ConfigWatch,
    ) -> Result<Self, Error> {
        let meta = WalIndexMeta::open(dir).await?;
        let authorization = match token {
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| Error::Fatal("the replication token is not ASCII".into()))?),
            None => None,
        };
        progress.send_modify(|p| {
            p.applied = meta.current_frame_no();
            p.settle();
        });
        Ok(PrimaryClient {
            // Frames come in batches up to a few MB; the primary bounds them, not this client.
            client: ReplicationLogClient::new(channel).max_decoding_message_size(usize::MAX),
            namespace: BinaryMetadataValue::from_bytes(namespace.as_str().as_bytes()),
            authorization,
            session: None,
            received: Arc::new(AtomicU64::new(meta.current_frame_no().unwrap_or(NONE))),
            meta,
            progress,
            config,
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let metadata = request.metadata_mut();
        metadata.insert_bin(NAMESPACE_METADATA_KEY, self.namespace.clone());
        if let Some(authorization) = &self.authorization {
            metadata.insert("authorization", authorization.clone());
        }
        if let Some(session) = &self.session {
            metadata.insert(SESSION_TOKEN_KEY, session.clone());
        }
        request
    }

    fn offset(&self) -> LogOffset {
        let received = self.received.load(Ordering::Acquire);
        LogOffset { next_offset: if received == NONE { 0 } else { received + 1 }, wal_flavor: None }
    }

    /// The frames of a stream, noting the newest frame_no received: a log's last, a
    /// snapshot's first (it comes newest first).
    /// A log's commit frame also moves what is known of the primary's end.
    fn track(&self, stream: tonic::Streaming<Frame>, snapshot: bool) -> FrameStream {
        let received = self.received.clone();
        let progress = self.progress.clone();
        let mut first = true;
        Box::pin(stream.map(move |frame| {
            let frame = frame.map_err(Error::from)?;
            let header = frame.data.get(..FRAME_HEADER).ok_or_else(|| Error::Client("a frame shorter than its header".into()))?;
            let frame_no = u64::from_le_bytes(header[..8].try_into().expect("8 bytes"));
            if !snapshot || std::mem::take(&mut first) {
                received.store(frame_no, Ordering::Release);
            }
            let commit = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes")) != 0;
            if !snapshot && commit {
                progress.send_if_modified(|p| {
                    let newer = p.primary.is_none_or(|primary| primary < frame_no);
                    if newer {
                        p.primary = Some(frame_no);
                        p.settle();
                    }
                    newer
                });
            }
            Ok(frame)
        }))
    }
}

#[tonic::async_trait]
impl ReplicatorClient for PrimaryClient {
    type FrameStream = FrameStream;

    /// A log_id other than the one this copy follows fails with `LogIncompatible`: the copy
    /// must then be discarded (see `follower`), since another primary's (or a rebuilt log's)
    /// frames cannot be applied on top of it.
    async fn handshake(&mut self) -> Result<(), Error> {
        let hello = match self.client.hello(self.request(HelloRequest::new())).await {
            Ok(hello) => hello.into_inner(),
            Err(status) => {
                // The replicator retries a while by itself; whoever waits for the copy
                // learns now that it is not coming yet (a namespace the primary does not
                // have is told apart: it is missing, not failing).
                let e = Error::from(status);
                if !matches!(e, Error::NamespaceDoesntExist) {
                    self.progress.send_if_modified(|p| !std::mem::replace(&mut p.failing, true));
                }
                return Err(e);
            }
        };
        let session = AsciiMetadataValue::try_from(hello.session_token.to_vec())
            .map_err(|_| Error::Client("the primary's session token is not ASCII".into()))?;
        let primary = hello.current_replication_index;
        // A primary that gives no configuration gives the default one (no key of its own).
        let config = hello.config.clone().unwrap_or_default();
        self.meta.init_from_hello(hello)?;
        self.meta.flush().await?;
        self.session = Some(session);
        self.config.send_if_modified(|known| {
            let changed = known.as_deref() != Some(&config);
            if changed {
                *known = Some(Arc::new(config));
            }
            changed
        });
        self.received.store(self.meta.current_frame_no().unwrap_or(NONE), Ordering::Release);
        self.progress.send_modify(|p| {
            p.primary = primary;
            p.greeted = true;
            p.failing = false;
            p.settle();
        });
        Ok(())
    }

    async fn next_frames(&mut self) -> Result<FrameStream, Error> {
        let stream = self.client.log_entries(self.request(self.offset())).await?.into_inner();
        Ok(self.track(stream, false))
    }

    async fn snapshot(&mut self) -> Result<FrameStream, Error> {
        let stream = self.client.snapshot(self.request(self.offset())).await?.into_inner();
        Ok(self.track(stream, true))
    }

    async fn commit_frame_no(&mut self, frame_no: FrameNo) -> Result<(), Error> {
        self.meta.set_commit_frame_no(frame_no).await?;
        self.progress.send_modify(|p| {
            p.applied = Some(frame_no);
            p.primary = p.primary.max(Some(frame_no));
            p.settle();
        });
        Ok(())
    }

    fn committed_frame_no(&self) -> Option<FrameNo> {
        self.meta.current_frame_no()
    }

    fn rollback(&mut self) {
        self.received.store(self.committed_frame_no().unwrap_or(NONE), Ordering::Release);
    }
}
