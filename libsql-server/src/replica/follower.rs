//! One namespace's copy of a primary's database, kept up to date by a task: bootstrapped on
//! start (from nothing, or from where a previous run left it), then following every commit.
//!
//! The copy is `data` (with SQLite's WAL) and its replicated index `client_wal_index` in the
//! namespace's directory, written by `libsql_replication`'s injector, one transaction at a
//! time: a `kill -9` leaves the copy at its last applied transaction and the index at it or
//! one behind (re-applying the last transaction is harmless), so the next run resumes from
//! there without downloading the rest again.
//!
//! A copy of another log (the primary's log was rebuilt, or it is another primary), or one
//! whose index is missing, is not known to be any state of the log it follows: its index is
//! dropped and it is brought to the log's state from the log's start. The data files stay
//! (readers may have them open): what comes first from a log's start is a full state of the
//! database (the snapshot, or the log's opening image; a log that starts at frame 0 with an
//! empty database writes every page it ever has), each page of it written, the file's size
//! set by its commit, all in one transaction. Until that commits, readers see the old copy.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use libsql_replication::injector::SqliteInjector;
use libsql_replication::meta::Error as MetaError;
use libsql_replication::rpc::metadata::DatabaseConfig;
use libsql_replication::replicator::{Error, Replicator};
use libsql_sys::rusqlite;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use super::client::{ConfigWatch, PrimaryClient, Progress};
use crate::blocking;
use crate::durable;
use crate::namespace::NamespaceName;

/// The replicated index beside the data file (the libSQL server's replica layout).
pub const INDEX: &str = "client_wal_index";

/// Frames the injector buffers before it writes them into SQLite's WAL (a large transaction
/// is written in pieces of this many; each piece costs a statement): 2 MB.
const INJECTOR_BUFFER: usize = 512;

/// How many pages SQLite's WAL of the copy holds before the injector checkpoints it.
const AUTO_CHECKPOINT: u32 = 1000;

/// Waits between attempts after a failure (the primary down, say), doubling up to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// What a copy came to while it was awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// It holds a state of the primary's log.
    Ready,
    /// The primary has no such namespace.
    Missing,
    /// Still bootstrapping.
    Pending,
}

pub struct Follower {
    progress: watch::Receiver<Progress>,
    config: watch::Receiver<Option<Arc<DatabaseConfig>>>,
    task: JoinHandle<()>,
}

impl Follower {
    /// Starts following namespace `ns` of the primary behind `channel` into `dir` (made if
    /// missing).
    pub fn start(channel: Channel, ns: NamespaceName, token: Option<String>, dir: PathBuf) -> Follower {
        let (progress, receiver) = watch::channel(Progress::default());
        let (config, config_receiver) = watch::channel(None);
        let task = tokio::spawn(run(channel, ns, token, dir, progress, config));
        Follower { progress: receiver, config: config_receiver, task }
    }

    /// Where the copy stands, as it moves.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.clone()
    }

    /// The namespace's configuration as the primary gave it at the last hello.
    pub fn config(&self) -> watch::Receiver<Option<Arc<DatabaseConfig>>> {
        self.config.clone()
    }

    /// Whether its task still runs (it ends only when the primary has no such namespace).
    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }

    /// Waits until the copy holds a state of the primary's log to read from (and, with
    /// `greeted`, until a hello gave the primary's configuration), at most `timeout`; what it
    /// came to. A copy that is not ready is `Pending` at once while following fails (the
    /// primary out of reach, or refusing): nothing is gained by waiting for the retries.
    pub async fn ready(&self, timeout: Duration, greeted: bool) -> Readiness {
        let mut progress = self.progress.clone();
        let usable = move |p: &Progress| p.ready() && (p.greeted || !greeted);
        let settled = async move {
            match progress.wait_for(|p| usable(p) || p.missing || p.failing).await {
                Ok(p) if p.missing => Readiness::Missing,
                Ok(p) if usable(&p) => Readiness::Ready,
                Ok(_) | Err(_) => Readiness::Pending,
            }
        };
        tokio::time::timeout(timeout, settled).await.unwrap_or(Readiness::Pending)
    }

    /// Where the copy stands now.
    pub fn now(&self) -> Progress {
        *self.progress.borrow()
    }

    /// Waits until the copy has a write its client made on the primary at `frame_no`, when
    /// the copy had started over `restarts` times: it has applied that frame, or has started
    /// over from a newer log since (whose opening state holds the write) and applied some of
    /// it; at most `timeout`. Whether it has.
    pub async fn wait_for_write(&self, frame_no: u64, restarts: u64, timeout: Duration) -> bool {
        let mut progress = self.progress.clone();
        let has = move |p: &Progress| p.applied.is_some_and(|applied| p.restarts != restarts || applied >= frame_no);
        let reached = async move { progress.wait_for(has).await.is_ok() };
        tokio::time::timeout(timeout, reached).await.unwrap_or(false)
    }

    /// Waits until the copy has applied `frame_no` (a write its client made on the primary),
    /// at most `timeout`; whether it has.
    pub async fn wait_for(&self, frame_no: u64, timeout: Duration) -> bool {
        let mut progress = self.progress.clone();
        let reached = async move { progress.wait_for(|p| p.applied.is_some_and(|applied| applied >= frame_no)).await.is_ok() };
        tokio::time::timeout(timeout, reached).await.unwrap_or(false)
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run(channel: Channel, ns: NamespaceName, token: Option<String>, dir: PathBuf, progress: watch::Sender<Progress>, config: ConfigWatch) {
    let mut retry = RETRY_FIRST;
    loop {
        match follow(&channel, &ns, token.as_deref(), &dir, &progress, &config).await {
            Error::NamespaceDoesntExist => {
                tracing::info!(namespace = %ns, "the primary has no such namespace; not following it");
                progress.send_modify(|p| p.missing = true);
                return;
            }
            Error::Meta(MetaError::LogIncompatible) => {
                tracing::info!(namespace = %ns, "the primary's log is not the one this copy follows; starting over from the log's start");
                if let Err(e) = forget_index(&dir).await {
                    tracing::error!(namespace = %ns, error = %e, "dropping the replica's index failed");
                    tokio::time::sleep(retry).await;
                }
                progress.send_modify(|p| {
                    p.applied = None;
                    p.greeted = false;
                    p.restarts += 1;
                });
            }
            e => {
                tracing::warn!(namespace = %ns, error = %e, retry_in = ?retry, "following the primary failed; retrying");
                progress.send_if_modified(|p| !std::mem::replace(&mut p.failing, true));
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(RETRY_MAX);
                continue;
            }
        }
        retry = RETRY_FIRST;
    }
}

/// Follows until an error ends it.
async fn follow(
    channel: &Channel,
    ns: &NamespaceName,
    token: Option<&str>,
    dir: &Path,
    progress: &watch::Sender<Progress>,
    config: &ConfigWatch,
) -> Error {
    // The namespace's directory is made here, each attempt (a name the primary turned out
    // not to have may have had its directory removed).
    let owned = dir.to_owned();
    match blocking::run(move || std::fs::create_dir_all(owned)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Error::Internal(e.into()),
        Err(e) => return Error::Internal(e.into()),
    }
    let client = match PrimaryClient::new(channel.clone(), ns, token, dir, progress.clone(), config.clone()).await {
        Ok(client) => client,
        Err(e) => return e,
    };
    let injector = match SqliteInjector::new(dir.join("data"), INJECTOR_BUFFER, AUTO_CHECKPOINT, None).await {
        Ok(injector) => injector,
        Err(e) => return e.into(),
    };
    let mut replicator = Replicator::new(client, injector);
    // The injector opens a connection per transaction and closes the previous one; were that
    // the file's last connection, each close would checkpoint (and sync) the whole WAL. One
    // connection held open for as long as the copy is followed keeps closes cheap.
    let data = dir.join("data");
    let _keeper = match blocking::run(move || rusqlite::Connection::open_with_flags(data, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)).await
    {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return Error::Internal(e.into()),
        Err(e) => return Error::Internal(e.into()),
    };
    loop {
        if let Err(e) = replicator.replicate().await {
            return e;
        }
    }
}

/// Drops the copy's index (the data files stay: see the module); syncs the directory.
async fn forget_index(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_owned();
    blocking::run(move || {
        match std::fs::remove_file(dir.join(INDEX)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        durable::sync_dir(&dir)
    })
    .await
    .map_err(std::io::Error::other)?
}
