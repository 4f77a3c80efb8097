//! Namespaces: the tenants of one server, each a database directory under `dbs/`.
//!
//! [`NamespaceStore`] owns their lifecycle (create, load on first use, close the least
//! recently used, destroy) under a per-namespace lock; [`Namespace`] is one loaded tenant.

mod meta;
mod name;
pub mod repair;
pub mod replica;
mod store;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use libsql_replication::rpc::metadata::DatabaseConfig;
pub use meta::{MetaError, MetaStore};
pub use name::{InvalidName, NamespaceName, MAX_NAME_LEN};
pub use replica::ReplicaCopy;
pub use store::{NamespaceStats, NamespaceStore, PrimaryLink, ReplicaStats, StoreOptions};

use crate::database::{self, Database};
use crate::replication::{self, LogError, ReplicationLogger};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("namespace {0} does not exist")]
    NotFound(NamespaceName),
    #[error("namespace {0} already exists")]
    AlreadyExists(NamespaceName),
    #[error(transparent)]
    InvalidName(#[from] InvalidName),
    #[error("namespaces are not enabled on this server (start it with --enable-namespaces)")]
    NamespacesDisabled,
    #[error("the default namespace cannot be deleted")]
    DefaultNamespace,
    #[error("namespace {0} was deleted")]
    Deleted(NamespaceName),
    #[error("namespace {name}: {source}")]
    Database { name: NamespaceName, source: database::Error },
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("namespace {name}: replication log: {source}")]
    Log { name: NamespaceName, source: LogError },
    #[error("namespace {name}: i/o on {path}: {source}", path = .path.display())]
    Io { name: NamespaceName, path: PathBuf, source: std::io::Error },
    #[error("namespace {name}: rebuild-data: {source}")]
    Rebuild { name: NamespaceName, source: crate::database::RebuildError },
    #[error("namespace {name}: reset-replication: {source}")]
    Reset { name: NamespaceName, source: crate::database::ResetError },
    #[error("the server is shutting down")]
    ShuttingDown,
    #[error("namespace {0}: this server is a replica; this is done on its primary")]
    NotPrimary(NamespaceName),
    #[error("namespace {0}: the replica is still copying it from the primary; retry shortly")]
    Bootstrapping(NamespaceName),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether the namespace exists but could not be opened (its files), rather than being
    /// missing, deleted, misnamed or the server stopping.
    pub fn is_open_failure(&self) -> bool {
        !matches!(
            self,
            Error::NotFound(_) | Error::Deleted(_) | Error::ShuttingDown | Error::InvalidName(_) | Error::NotPrimary(_) | Error::Bootstrapping(_)
        )
    }

    /// The error's code in answers, on every transport.
    pub fn code(&self) -> &'static str {
        use crate::database::{RebuildError, ResetError};
        match self {
            Error::NotFound(_) | Error::Deleted(_) => "NAMESPACE_NOT_FOUND",
            Error::AlreadyExists(_) => "NAMESPACE_EXISTS",
            Error::InvalidName(_) => "NAMESPACE_INVALID",
            Error::NamespacesDisabled => "NAMESPACES_DISABLED",
            Error::DefaultNamespace => "NAMESPACE_DEFAULT",
            Error::ShuttingDown => "SHUTTING_DOWN",
            Error::NotPrimary(_) => "NOT_PRIMARY",
            Error::Bootstrapping(_) => "REPLICA_BOOTSTRAPPING",
            Error::Rebuild { source, .. } => match source {
                RebuildError::LogCorrupt(_) => "LOG_CORRUPT",
                RebuildError::ReplayCorrupt(_) => "REPLAY_CORRUPT",
                RebuildError::Busy(_) => "REPAIR_BUSY",
                RebuildError::Failed(_) => "INTERNAL",
            },
            Error::Reset { source, .. } => match source {
                ResetError::Busy(_) => "REPAIR_BUSY",
                ResetError::DataCorrupt(_) => "DATA_CORRUPT",
                ResetError::Unchecked(_) => "CHECK_FAILED",
                ResetError::Unopenable(_) => "UNOPENABLE",
                ResetError::Log(_) | ResetError::Database(_) => "INTERNAL",
            },
            Error::Database { .. } | Error::Meta(_) | Error::Log { .. } | Error::Io { .. } | Error::Internal(_) => "INTERNAL",
        }
    }
}

/// One loaded namespace. Held in an `Arc` by the store and by every request using it; the
/// store closes it only when nobody else holds it.
pub struct Namespace {
    name: NamespaceName,
    dir: PathBuf,
    db: Database,
    /// Set once the namespace is deleted, so streams still holding it stop using it.
    deleted: AtomicBool,
    recovery: replication::RecoveryOptions,
    /// Held by a repair from start to end, and by `close`: repairs of one namespace take
    /// turns, and a delete, an eviction or a shutdown waits for the one in flight.
    repairing: std::sync::Mutex<()>,
    /// On a replica: the follower keeping the copy and the way to the primary.
    replica: Option<ReplicaCopy>,
}

impl Namespace {
    /// The database file's name inside the namespace directory.
    pub const DATA_FILE: &'static str = "data";

    /// Opens the namespace in `dir` (which exists). Blocking.
    fn open(name: NamespaceName, dir: PathBuf, config: DatabaseConfig, settings: &store::Settings) -> Result<Self, Error> {
        let data = dir.join(Self::DATA_FILE);
        let (logger, _rebuild) = replication::recovery::open(&dir, &data, settings.log, settings.recovery)
            .map_err(|source| Error::Log { name: name.clone(), source })?;
        let db = Database::open(&data, config, settings.limits.clone(), logger)
            .map_err(|source| Error::Database { name: name.clone(), source })?;
        Ok(Namespace { name, dir, db, deleted: AtomicBool::new(false), recovery: settings.recovery, repairing: Default::default(), replica: None })
    }

    /// Opens a replica's copy in `dir`, which `copy`'s follower keeps. Blocking.
    fn open_replica(name: NamespaceName, dir: PathBuf, config: DatabaseConfig, copy: ReplicaCopy, settings: &store::Settings) -> Result<Self, Error> {
        let db = Database::open_replica(&dir.join(Self::DATA_FILE), config, settings.limits.clone())
            .map_err(|source| Error::Database { name: name.clone(), source })?;
        let recovery = settings.recovery;
        Ok(Namespace { name, dir, db, deleted: AtomicBool::new(false), recovery, repairing: Default::default(), replica: Some(copy) })
    }

    /// On a replica: its copy's follower and the way to the primary.
    pub fn replica(&self) -> Option<&ReplicaCopy> {
        self.replica.as_ref()
    }

    /// The namespace's replication log; a replica has none of its own.
    pub fn log(&self) -> Result<&Arc<ReplicationLogger>, Error> {
        self.db.logger().ok_or_else(|| Error::NotPrimary(self.name.clone()))
    }

    pub fn name(&self) -> &NamespaceName {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn db(&self) -> &Database {
        &self.db
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Fails once the namespace was deleted: a stream must not keep writing into a removed file.
    pub fn check_live(&self) -> Result<(), Error> {
        if self.is_deleted() {
            return Err(Error::Deleted(self.name.clone()));
        }
        Ok(())
    }

    /// Runs the repair `f` on the namespace's database, after any repair in flight and never
    /// beside a close; not at all once the namespace is deleted. Blocking.
    pub fn repair<T>(&self, f: impl FnOnce(&Database) -> T) -> Result<T, Error> {
        let _turn = self.repairing.lock().unwrap_or_else(|e| e.into_inner());
        self.check_live()?;
        Ok(f(&self.db))
    }

    pub fn database_error(&self, source: database::Error) -> Error {
        Error::Database { name: self.name.clone(), source }
    }

    /// Checkpoints, closes the idle connections, and marks the log clean (the sentinel goes).
    /// Blocking. After an error the sentinel stays, so the next open rebuilds the log.
    fn close(&self) -> Result<(), Error> {
        let _no_repair = self.repairing.lock().unwrap_or_else(|e| e.into_inner());
        self.db.close().map_err(|e| self.database_error(e))?;
        match self.db.logger() {
            Some(logger) => replication::recovery::close(logger, self.recovery).map_err(|source| Error::Log { name: self.name.clone(), source }),
            None => Ok(()),
        }
    }
}
