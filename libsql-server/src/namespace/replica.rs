//! Replica mode (`--primary-grpc-url`): every namespace is a copy of the primary's, kept by a
//! [`Follower`]. A namespace is bootstrapped on first use (the primary says whether it
//! exists), followed while it is loaded, and resumed from its copy when it is loaded again.
//! Its database takes reads only; what the copy cannot run goes to the primary through
//! [`PrimaryWrites`] (see `hrana::forward`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;

use super::{Error, NamespaceName};
use crate::blocking;
use crate::replica::{follower, Follower, PrimaryWrites, Progress, Readiness};

/// How long a request waits for a namespace's first copy; past it the request is refused
/// (503) and the bootstrap goes on.
const BOOTSTRAP_WAIT: Duration = Duration::from_secs(30);

/// How long a read waits for the copy to catch up with a write its stream made.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// The primary a replica follows, and the followers of its namespaces.
pub struct Replicas {
    channel: Channel,
    token: Option<String>,
    writes: PrimaryWrites,
    runtime: tokio::runtime::Handle,
    followers: Mutex<HashMap<NamespaceName, Arc<Follower>>>,
}

/// What a loaded replica namespace holds beside its database.
#[derive(Clone)]
pub struct ReplicaCopy {
    pub follower: Arc<Follower>,
    pub writes: PrimaryWrites,
    /// Where blocking code (a stream's statements) runs its calls to the primary.
    pub runtime: tokio::runtime::Handle,
}

impl ReplicaCopy {
    /// Runs `call` to the primary from a blocking thread.
    pub fn block_on<F: std::future::Future>(&self, call: F) -> F::Output {
        self.runtime.block_on(call)
    }

    /// Waits (blocking) until the copy has applied `frame_no`; whether it has.
    pub fn catch_up(&self, frame_no: u64) -> bool {
        self.runtime.block_on(self.follower.wait_for(frame_no, CATCH_UP_WAIT))
    }

    pub fn progress(&self) -> Progress {
        self.follower.now()
    }
}

impl Replicas {
    /// Follows the primary behind `channel`, with `token` as the credential. Called on the
    /// runtime.
    pub fn new(channel: Channel, token: Option<String>) -> Result<Self, Error> {
        let writes = PrimaryWrites::new(channel.clone(), token.as_deref()).map_err(|e| Error::Internal(e.message().to_owned()))?;
        let runtime = tokio::runtime::Handle::current();
        Ok(Replicas { channel, token, writes, runtime, followers: Mutex::default() })
    }

    /// Waits until the copy of `name` (in `dir`) holds a state of the primary's log,
    /// starting its follower if none runs.
    pub async fn ready(&self, name: &NamespaceName, dir: &Path) -> Result<(), Error> {
        let follower = self.follower(name, dir).await?;
        match follower.ready(BOOTSTRAP_WAIT).await {
            Readiness::Ready => Ok(()),
            Readiness::Pending => Err(Error::Bootstrapping(name.clone())),
            Readiness::Missing => {
                // Asked for by name, not known to the primary: what the follower created
                // goes, unless it ever held a copy.
                let dir = dir.to_owned();
                let emptied = blocking::run(move || remove_if_never_followed(&dir)).await;
                if let Ok(Err(e)) = emptied {
                    tracing::warn!(namespace = %name, error = %e, "removing the directory of a namespace the primary does not have failed");
                }
                self.stop_if(name, &follower);
                Err(Error::NotFound(name.clone()))
            }
        }
    }

    /// What a namespace loaded from `name`'s copy holds.
    pub async fn copy(&self, name: &NamespaceName, dir: &Path) -> Result<ReplicaCopy, Error> {
        let follower = self.follower(name, dir).await?;
        Ok(ReplicaCopy { follower, writes: self.writes.clone(), runtime: self.runtime.clone() })
    }

    /// Stops following `name` (its namespace was closed); the copy stays for the next load.
    pub fn stop(&self, name: &NamespaceName) {
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }

    /// Where each followed namespace's copy stands, by name.
    pub fn progress(&self) -> Vec<(NamespaceName, Progress)> {
        let followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        let mut progress: Vec<_> = followers.iter().map(|(name, f)| (name.clone(), f.now())).collect();
        progress.sort_by(|a, b| a.0.cmp(&b.0));
        progress
    }

    /// Stops following every namespace (shutdown).
    pub fn stop_all(&self) {
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn stop_if(&self, name: &NamespaceName, follower: &Arc<Follower>) {
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        if followers.get(name).is_some_and(|f| Arc::ptr_eq(f, follower)) {
            followers.remove(name);
        }
    }

    async fn follower(&self, name: &NamespaceName, dir: &Path) -> Result<Arc<Follower>, Error> {
        if let Some(follower) = self.followers.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok(follower.clone());
        }
        let owned: PathBuf = dir.to_owned();
        blocking::run(move || std::fs::create_dir_all(&owned))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|source| Error::Io { name: name.clone(), path: dir.to_owned(), source })?;
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        let follower = followers
            .entry(name.clone())
            .or_insert_with(|| Arc::new(Follower::start(self.channel.clone(), name.clone(), self.token.clone(), dir.to_owned())));
        Ok(follower.clone())
    }
}

/// Removes `dir` if it never held a copy (no replicated index). Blocking.
fn remove_if_never_followed(dir: &Path) -> std::io::Result<()> {
    let index = dir.join(follower::INDEX);
    if std::fs::metadata(&index).is_ok_and(|m| m.len() > 0) {
        return Ok(());
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}
