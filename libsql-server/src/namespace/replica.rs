//! Replica mode (`--primary-grpc-url`): every namespace is a copy of the primary's, kept by a
//! [`Follower`]. A namespace is bootstrapped on first use (the primary says whether it
//! exists), followed while it is loaded, and resumed from its copy when it is loaded again.
//! Its database takes reads only; what the copy cannot run goes to the primary through
//! [`PrimaryWrites`] (see `hrana::forward`).

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic::transport::Channel;

use super::{DatabaseConfig, Error, NamespaceName};
use crate::replica::{follower, Follower, PrimaryWrites, Progress, Readiness};

/// How long a request waits for a namespace's first copy; past it the request is refused
/// (503) and the bootstrap goes on.
const BOOTSTRAP_WAIT: Duration = Duration::from_secs(30);

/// Copies bootstrapping at once; a namespace asked for past them waits its turn (503).
const MAX_BOOTSTRAPPING: usize = 16;

/// How long a read waits for the copy to catch up with a write its stream made.
pub const CATCH_UP_WAIT: Duration = Duration::from_secs(10);

/// The primary a replica follows, and the followers of its namespaces.
pub struct Replicas {
    channels: Vec<Channel>,
    /// Which of `channels` the next follower takes (in turn).
    next_channel: std::sync::atomic::AtomicUsize,
    token: Option<String>,
    writes: PrimaryWrites,
    runtime: tokio::runtime::Handle,
    followers: Mutex<HashMap<NamespaceName, Followed>>,
    /// Namespaces whose configuration (its `jwt_key` above all) this replica holds: stored
    /// before this run, or given by the primary since. Until then a namespace is not served.
    known: Mutex<HashSet<NamespaceName>>,
}

struct Followed {
    follower: Arc<Follower>,
    /// The configuration the primary gave, marked seen once it was taken up.
    config: tokio::sync::watch::Receiver<Option<Arc<DatabaseConfig>>>,
}

impl Followed {
    /// Copying, and getting on with it: not ready yet, not failing (a follower the primary
    /// keeps refusing does not hold a place among the copies, and may be pruned).
    fn bootstrapping(&self) -> bool {
        let progress = self.follower.now();
        self.follower.is_running() && !progress.missing && !progress.ready() && !progress.failing
    }
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

    /// Waits (blocking) until the copy has a write made at `frame_no` (see
    /// `Follower::wait_for_write`); whether it has.
    pub fn catch_up(&self, frame_no: u64, restarts: u64) -> bool {
        self.runtime.block_on(self.follower.wait_for_write(frame_no, restarts, CATCH_UP_WAIT))
    }

    pub fn progress(&self) -> Progress {
        self.follower.now()
    }
}

impl Replicas {
    /// Follows the primary behind `channel`, with `token` as the credential. Called on the
    /// runtime.
    pub fn new(link: super::PrimaryLink, known: impl IntoIterator<Item = NamespaceName>) -> Result<Self, Error> {
        let writes = PrimaryWrites::new(link.writes, link.token.as_deref()).map_err(|e| Error::Internal(e.message().to_owned()))?;
        let runtime = tokio::runtime::Handle::current();
        let known = Mutex::new(known.into_iter().collect());
        if link.channels.is_empty() {
            return Err(Error::Internal("a replica needs a channel to its primary".into()));
        }
        Ok(Replicas {
            channels: link.channels,
            next_channel: Default::default(),
            token: link.token,
            writes,
            runtime,
            followers: Mutex::default(),
            known,
        })
    }

    /// Waits until the copy of `name` (in `dir`) holds a state of the primary's log,
    /// starting its follower if none runs.
    pub async fn ready(&self, name: &NamespaceName, dir: &Path) -> Result<(), Error> {
        let follower = self.follower(name, dir).await?;
        match follower.ready(BOOTSTRAP_WAIT, !self.config_known(name)).await {
            Readiness::Ready => Ok(()),
            Readiness::Pending => Err(Error::Bootstrapping(name.clone())),
            Readiness::Missing => {
                self.stop_if(name, &follower);
                Err(Error::NotFound(name.clone()))
            }
        }
    }

    /// The configuration the primary gave for `name` since it was last taken, if any: to be
    /// stored and obeyed, then taken ([`Self::mark_known`]; until then it is given again).
    pub fn new_config(&self, name: &NamespaceName) -> Option<DatabaseConfig> {
        let followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        let followed = followers.get(name)?;
        if !followed.config.has_changed().unwrap_or(false) {
            return None;
        }
        let config = followed.config.borrow().as_deref().cloned();
        config
    }

    /// Notes that `config`, given for `name`, is stored and obeyed.
    pub fn mark_known(&self, name: &NamespaceName, config: &DatabaseConfig) {
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(followed) = followers.get_mut(name) {
            // Taken, unless a newer one came meanwhile.
            if followed.config.borrow().as_deref() == Some(config) {
                followed.config.borrow_and_update();
            }
        }
        drop(followers);
        self.known.lock().unwrap_or_else(|e| e.into_inner()).insert(name.clone());
    }

    /// Whether this replica holds `name`'s configuration (see `known`).
    pub fn config_known(&self, name: &NamespaceName) -> bool {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).contains(name)
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
        let mut progress: Vec<_> = followers.iter().map(|(name, f)| (name.clone(), f.follower.now())).collect();
        progress.sort_by(|a, b| a.0.cmp(&b.0));
        progress
    }

    /// Stops the followers of namespaces `keep` does not keep (not loaded), those still
    /// bootstrapping aside, once there are more than `max` followers: a name asked for once
    /// is not followed for good, nor one the primary keeps refusing.
    pub fn prune(&self, max: usize, keep: impl Fn(&NamespaceName) -> bool) {
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        if followers.len() <= max {
            return;
        }
        followers.retain(|name, f| keep(name) || f.bootstrapping());
    }

    /// Stops following every namespace (shutdown).
    pub fn stop_all(&self) {
        self.followers.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn stop_if(&self, name: &NamespaceName, follower: &Arc<Follower>) {
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        if followers.get(name).is_some_and(|f| Arc::ptr_eq(&f.follower, follower)) {
            followers.remove(name);
        }
    }

    /// The follower of `name`, started if none runs (or the one that ran ended).
    async fn follower(&self, name: &NamespaceName, dir: &Path) -> Result<Arc<Follower>, Error> {
        if let Some(follower) = self.running(name) {
            return Ok(follower);
        }
        let mut followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(followed) = followers.get(name).filter(|f| f.follower.is_running() || f.follower.now().missing) {
            return Ok(followed.follower.clone());
        }
        // None, or one whose task ended otherwise (it never does, barring a panic).
        let bootstrapping = followers.values().filter(|f| f.bootstrapping()).count();
        if bootstrapping >= MAX_BOOTSTRAPPING {
            return Err(Error::Bootstrapping(name.clone()));
        }
        let turn = self.next_channel.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let channel = self.channels[turn % self.channels.len()].clone();
        let follower = Arc::new(Follower::start(channel, name.clone(), self.token.clone(), dir.to_owned()));
        let config = follower.config();
        followers.insert(name.clone(), Followed { follower: follower.clone(), config });
        Ok(follower)
    }

    /// Removes `dir`, what a follower made for `name` which the primary does not have, if it
    /// never held a copy (no replicated index) and no follower has started for it since.
    /// Blocking; called with the namespace's slot locked and nothing loaded in it.
    pub fn remove_unfollowed(&self, name: &NamespaceName, dir: &Path) -> std::io::Result<()> {
        // Held across the removal: no follower starts for the name meanwhile.
        let followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        if followers.contains_key(name) || std::fs::metadata(dir.join(follower::INDEX)).is_ok_and(|m| m.len() > 0) {
            return Ok(());
        }
        match std::fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The follower of `name`, if one runs (or ended because the primary has no such
    /// namespace).
    fn running(&self, name: &NamespaceName) -> Option<Arc<Follower>> {
        let followers = self.followers.lock().unwrap_or_else(|e| e.into_inner());
        let followed = followers.get(name)?;
        (followed.follower.is_running() || followed.follower.now().missing).then(|| followed.follower.clone())
    }
}
