//! The store's side of replica mode (`--primary-grpc-url`): namespaces copied from the
//! primary (see `namespace::replica`), their configuration taken from it, and what only a
//! primary does refused.

use serde::Serialize;

use super::{internal, NamespaceStore};
use crate::blocking;
use crate::namespace::replica::Replicas;
use crate::namespace::{DatabaseConfig, Error, NamespaceName};
use crate::replica::Progress;

/// The primary a replica follows: its gRPC channels (each one HTTP/2 connection, opened on
/// first use), and the credential sent with every call.
#[derive(Debug, Clone)]
pub struct PrimaryLink {
    /// What followers pull through, each namespace on one of them (a following namespace
    /// keeps a stream open; a primary bounds the streams of one connection).
    pub channels: Vec<tonic::transport::Channel>,
    /// What forwarded writes go through, apart from the followers' streams.
    pub writes: tonic::transport::Channel,
    pub token: Option<String>,
}

/// Where a replica's copy stands.
#[derive(Debug, Serialize)]
pub struct ReplicaStats {
    /// The frame_no of the primary's log the copy has applied.
    pub replicated_index: Option<u64>,
    /// The primary's last frame_no as last heard.
    pub primary_index: Option<u64>,
    pub lag_frames: u64,
    pub lag_seconds: f64,
}

impl ReplicaStats {
    pub fn of(progress: &Progress) -> Self {
        ReplicaStats {
            replicated_index: progress.applied,
            primary_index: progress.primary,
            lag_frames: progress.lag_frames(),
            lag_seconds: progress.lag_seconds(),
        }
    }
}

impl NamespaceStore {
    /// On a replica, before `name` is loaded: its copy ready (a name the primary does not
    /// have is forgotten).
    pub(super) async fn replica_ready(&self, name: &NamespaceName) -> Result<(), Error> {
        let Some(replicas) = &self.inner.replicas else {
            return Ok(());
        };
        replicas.prune(self.inner.settings.max_active, |name| self.is_loaded(name));
        if let Err(e) = replicas.ready(name, &self.inner.dir_of(name)).await {
            if let Error::NotFound(_) = e {
                self.forget_missing(name).await;
            }
            return Err(e);
        }
        Ok(())
    }

    /// On a replica: where each followed namespace's copy stands.
    pub fn replica_progress(&self) -> Vec<(NamespaceName, Progress)> {
        self.inner.replicas.as_ref().map(Replicas::progress).unwrap_or_default()
    }

    /// On a replica: the configuration the primary gave for `name` since it was last taken,
    /// stored (so it holds after a restart) and its `jwt_key` obeyed; to be set on the
    /// loaded namespace.
    /// Called with the namespace's slot locked, so configurations are taken up in turn.
    pub(super) async fn adopt_config(&self, name: &NamespaceName) -> Result<Option<DatabaseConfig>, Error> {
        let Some(replicas) = &self.inner.replicas else {
            return Ok(None);
        };
        let Some(config) = replicas.new_config(name) else {
            return Ok(None);
        };
        let (meta, stored, name2) = (self.inner.meta.clone(), config.clone(), name.clone());
        blocking::run(move || meta.put(&name2, &stored)).await.map_err(internal)??;
        self.set_jwt_key(name, config.jwt_key.clone());
        replicas.mark_known(name, &config);
        Ok(Some(config))
    }

    /// On a replica: a name the primary does not have leaves nothing behind, unless it held
    /// a copy (the primary deleted it, say) or is loaded.
    async fn forget_missing(&self, name: &NamespaceName) {
        let slot = self.slot(name);
        let guard = slot.ns.lock().await;
        if guard.is_none() {
            let (store, name2) = (self.clone(), name.clone());
            let removed = blocking::run(move || {
                let dir = store.inner.dir_of(&name2);
                store.inner.replicas.as_ref().map_or(Ok(()), |replicas| replicas.remove_unfollowed(&name2, &dir))
            });
            if let Ok(Err(e)) = removed.await {
                tracing::warn!(namespace = %name, error = %e, "removing the directory of a namespace the primary does not have failed");
            }
            self.forget_slot_if_unused(name, &slot);
        }
    }

    /// Before a credential is checked on `name`: on a replica, makes sure the namespace's
    /// configuration (its own `jwt_key`) is known, copying the namespace first if need be,
    /// so no request is let in under a key the replica has not heard of yet.
    pub async fn learn_config(&self, name: &NamespaceName) -> Result<(), Error> {
        match &self.inner.replicas {
            Some(replicas) if !replicas.config_known(name) => {
                self.get(name).await?;
                // Still unknown (its follower was pruned meanwhile, say): not let in yet.
                match replicas.config_known(name) {
                    true => Ok(()),
                    false => Err(Error::Bootstrapping(name.clone())),
                }
            }
            _ => Ok(()),
        }
    }

    /// Whether this server is a replica (`--primary-grpc-url`).
    pub fn is_replica(&self) -> bool {
        self.inner.replicas.is_some()
    }

    /// Refuses on a replica what only its primary does (creating, deleting, configuring and
    /// repairing namespaces).
    pub(super) fn primary_only(&self, name: &NamespaceName) -> Result<(), Error> {
        match self.is_replica() {
            true => Err(Error::NotPrimary(name.clone())),
            false => Ok(()),
        }
    }

    /// On a replica, a repair is refused once `name` is found (a missing one is 404): its
    /// copy is the primary's log's, which only the primary repairs.
    pub(super) async fn repaired_on_primary_only(&self, name: &NamespaceName) -> Result<(), Error> {
        if self.is_replica() {
            self.get(name).await?;
            return Err(Error::NotPrimary(name.clone()));
        }
        Ok(())
    }

    /// Whether `name` is loaded (or being loaded or closed: its slot is locked).
    fn is_loaded(&self, name: &NamespaceName) -> bool {
        let slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.get(name).is_some_and(|slot| slot.ns.try_lock().map_or(true, |ns| ns.is_some()))
    }
}
