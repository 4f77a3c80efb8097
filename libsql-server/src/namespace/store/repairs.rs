//! The store's side of repair: integrity checks from a namespace's files (one at a time),
//! reset-replication and rebuild-data, each under the namespace's own locks.

use std::sync::atomic::Ordering;

use super::{internal, NamespaceStore};
use crate::blocking;
use crate::database::{check_data_file, RebuildError, Rebuilt, Reset, ResetError};
use crate::namespace::repair::{self, Verdict};
use crate::namespace::{Error, NamespaceName};

impl NamespaceStore {
    /// Checks the namespace's data file and replication log from its files (it need not be
    /// able to open) and names the repair that fixes what was found. Checks run one at a time.
    pub async fn integrity_check(&self, name: &NamespaceName, full: bool) -> Result<Verdict, Error> {
        self.check_running()?;
        let _turn = self.inner.checks.acquire().await.map_err(|_| Error::ShuttingDown)?;
        // A replica's copy has no log of its own: its data file is checked.
        let copy = match self.is_replica() {
            true => Some(self.get(name).await?.replica().map(|copy| copy.progress().applied)),
            false => None,
        };
        let dir = self.inner.dir_of(name);
        let name = name.clone();
        blocking::run_in_background(move || match copy {
            Some(applied) => Ok(repair::integrity_check_copy(&dir, full, applied.flatten())),
            None if dir.is_dir() => Ok(repair::integrity_check(&dir, full)),
            None => Err(Error::NotFound(name)),
        })
        .await
        .map_err(internal)?
    }

    /// Rebuilds the namespace's replication log from its live data (see
    /// `Database::reset_replication`). A namespace that cannot open is refused, and stays
    /// unloaded for the next attempt.
    pub async fn reset_replication(&self, name: &NamespaceName) -> Result<Reset, Error> {
        self.repaired_on_primary_only(name).await?;
        let ns = match self.get(name).await {
            Ok(ns) => ns,
            Err(e) if !e.is_open_failure() => return Err(e),
            Err(e) => {
                // Say whether the data itself is what keeps it from opening.
                let data = self.inner.dir_of(name).join(crate::replication::DATA);
                let check = blocking::run_in_background(move || check_data_file(&data, false)).await.map_err(internal)?;
                let source = match check.ok || !check.judged {
                    true => ResetError::Unopenable(e.to_string()),
                    false => ResetError::DataCorrupt(check.message),
                };
                return Err(Error::Reset { name: name.clone(), source });
            }
        };
        let name = name.clone();
        blocking::run(move || ns.repair(|db| db.reset_replication()))
            .await
            .map_err(internal)??
            .map_err(|source| Error::Reset { name, source })
    }

    /// Rebuilds the namespace's data file from its replication log: online (see
    /// `Database::rebuild_data`) when it can, otherwise (its data file's header is damaged,
    /// say, so it cannot open or take the rebuilt pages) closed, rebuilt while unloaded under
    /// its lifecycle lock, and opened again; streams still holding the closed one fail.
    pub async fn rebuild_data(&self, name: &NamespaceName) -> Result<Rebuilt, Error> {
        self.repaired_on_primary_only(name).await?;
        let rebuild_error = |source| Error::Rebuild { name: name.clone(), source };
        match self.get(name).await {
            Ok(ns) => match blocking::run(move || ns.repair(|db| db.rebuild_data())).await.map_err(internal)?? {
                Ok(rebuilt) => return Ok(rebuilt),
                Err(RebuildError::Failed(e)) => {
                    tracing::warn!(namespace = %name, error = %e, "rebuilding the data online failed: the namespace is closed and rebuilt unloaded")
                }
                Err(e) => return Err(rebuild_error(e)),
            },
            Err(e) if !e.is_open_failure() => return Err(e),
            Err(e) => {
                tracing::warn!(namespace = %name, error = %e, "the namespace cannot open: its data file is rebuilt while it is unloaded")
            }
        }
        let slot = self.slot(name);
        let mut guard = slot.ns.lock().await;
        if let Some(ns) = guard.take() {
            self.inner.loaded.fetch_sub(1, Ordering::AcqRel);
            blocking::run(move || {
                if let Err(e) = ns.close() {
                    tracing::warn!(namespace = %ns.name, error = %e, "closing a namespace for a rebuild of its data failed");
                }
            })
            .await
            .map_err(internal)?;
        }
        let dir = self.inner.dir_of(name);
        let rebuilt = blocking::run(move || repair::rebuild_unloaded(&dir)).await.map_err(internal)?.map_err(rebuild_error)?;
        self.load_locked(name, &slot, &mut guard).await?;
        Ok(rebuilt)
    }
}
