//! The namespace store: which namespaces exist, which are open, and the lock that keeps
//! create, load, close and destroy of one namespace from ever racing each other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

use super::replica::Replicas;
pub use replicas::{PrimaryLink, ReplicaStats};
use super::{DatabaseConfig, Error, MetaStore, Namespace, NamespaceName};
use crate::blocking;
use crate::database::{CheckpointMode, Limits};
use crate::durable;
use crate::replication::{LogSettings, LogStats, RecoveryOptions};

/// Prefix of a namespace directory being deleted. Namespace names cannot hold a '.', so no
/// namespace is ever mistaken for one.
const DELETING_PREFIX: &str = ".deleting-";

mod repairs;
mod replicas;

pub(super) struct Settings {
    pub limits: Limits,
    pub log: LogSettings,
    pub recovery: RecoveryOptions,
    pub max_active: usize,
    pub namespaces_enabled: bool,
}

#[derive(Clone)]
pub struct NamespaceStore {
    inner: Arc<Inner>,
}

struct Inner {
    dbs_dir: PathBuf,
    meta: Arc<MetaStore>,
    settings: Settings,
    slots: Mutex<HashMap<NamespaceName, Arc<Slot>>>,
    /// Logical clock for least-recently-used ordering.
    clock: AtomicU64,
    loaded: AtomicUsize,
    shutting_down: AtomicBool,
    /// A `trim` is running (one at a time: a slow close must not pile trims up).
    trimming: AtomicBool,
    /// Integrity checks running at once (each reads a whole namespace): a flood of them
    /// queues here instead of taking every blocking thread and disk.
    checks: tokio::sync::Semaphore,
    /// Every namespace's own `jwt_key`, kept in memory (from the metastore at open, then on
    /// every create, configuration change and delete): authentication reads it on every
    /// request without loading the namespace or touching the disk.
    jwt_keys: RwLock<HashMap<NamespaceName, Arc<str>>>,
    /// Replica mode: the primary followed, and its namespaces' followers.
    replicas: Option<Replicas>,
}

/// Integrity checks that may run at once.
const CONCURRENT_CHECKS: usize = 1;

/// One namespace's place in the store. Its mutex is the per-namespace lifecycle lock: whoever
/// holds it may load, close, create or destroy the namespace.
#[derive(Default)]
struct Slot {
    ns: tokio::sync::Mutex<Option<Arc<Namespace>>>,
    last_used: AtomicU64,
}

type SlotGuard<'a> = tokio::sync::MutexGuard<'a, Option<Arc<Namespace>>>;

/// How the store opens namespaces.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub namespaces_enabled: bool,
    pub max_active: usize,
    pub limits: Limits,
    pub log: LogSettings,
    pub recovery: RecoveryOptions,
    /// Replica mode: the primary every namespace is copied from.
    pub primary: Option<PrimaryLink>,
}

#[derive(Debug, Serialize)]
pub struct NamespaceStats {
    pub namespace: String,
    pub data_file_bytes: u64,
    pub wal_file_bytes: u64,
    pub block_reads: bool,
    pub block_writes: bool,
    /// The namespace's own log (a primary's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replication: Option<LogStats>,
    /// A replica's copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaStats>,
}

impl NamespaceStore {
    /// Opens the store under `db_path`, creating the layout on a fresh directory and the
    /// `default` namespace if it is missing. Blocking work runs on the blocking pool.
    pub async fn open(db_path: &Path, options: StoreOptions) -> Result<Self, Error> {
        let StoreOptions { namespaces_enabled, max_active, limits, log, recovery, primary } = options;
        // Before SQLite starts (the first connection of the process): statements are metered.
        if limits.statement_memory.is_some() {
            crate::database::meter_statement_memory();
        }
        let db_path = db_path.to_owned();
        let (dbs_dir, meta, jwt_keys) = blocking::run(move || -> Result<_, Error> {
            let dbs_dir = db_path.join("dbs");
            let io = |path: &Path, source| Error::Io { name: NamespaceName::default_namespace(), path: path.to_owned(), source };
            std::fs::create_dir_all(&dbs_dir).map_err(|e| io(&dbs_dir, e))?;
            remove_interrupted_deletions(&dbs_dir);
            let meta = MetaStore::open(&db_path.join("metastore"))?;
            let version = db_path.join(".version");
            durable::write_file(&version, env!("CARGO_PKG_VERSION").as_bytes()).map_err(|e| io(&version, e))?;
            let mut jwt_keys = HashMap::new();
            for (name, key) in meta.jwt_keys()? {
                // A name this server would refuse cannot be addressed: its key guards nothing.
                if let Ok(name) = NamespaceName::new(name) {
                    jwt_keys.insert(name, Arc::from(key));
                }
            }
            Ok((dbs_dir, meta, jwt_keys))
        })
        .await
        .map_err(internal)??;
        let replicas = match primary {
            Some(link) => {
                // A namespace whose configuration was stored is served from it until the
                // primary gives it again.
                let names = meta.names()?.into_iter().filter_map(|name| NamespaceName::new(name).ok());
                Some(Replicas::new(link, names)?)
            }
            None => None,
        };

        let store = NamespaceStore {
            inner: Arc::new(Inner {
                dbs_dir,
                meta: Arc::new(meta),
                settings: Settings { limits, log, recovery, max_active: max_active.max(1), namespaces_enabled },
                slots: Mutex::new(HashMap::new()),
                clock: AtomicU64::new(0),
                loaded: AtomicUsize::new(0),
                shutting_down: AtomicBool::new(false),
                trimming: AtomicBool::new(false),
                checks: tokio::sync::Semaphore::new(CONCURRENT_CHECKS),
                jwt_keys: RwLock::new(jwt_keys),
                replicas,
            }),
        };
        if store.is_replica() {
            // A replica's namespaces, the default one too, come from the primary.
            return Ok(store);
        }
        let default = NamespaceName::default_namespace();
        match store.create(&default, DatabaseConfig::default()).await {
            Ok(()) | Err(Error::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(store)
    }

    pub fn namespaces_enabled(&self) -> bool {
        self.inner.settings.namespaces_enabled
    }

    /// The namespace, loaded on first use (on a replica, once its copy is ready).
    pub async fn get(&self, name: &NamespaceName) -> Result<Arc<Namespace>, Error> {
        self.check_running()?;
        self.replica_ready(name).await?;
        let slot = self.slot(name);
        let mut guard = slot.ns.lock().await;
        let adopted = self.adopt_config(name).await?;
        let ns = self.load_locked(name, &slot, &mut guard).await?;
        if let Some(config) = adopted {
            ns.db().set_config(config);
        }
        drop(guard);
        self.evict_idle(Some(name)).await;
        Ok(ns)
    }

    /// Creates a namespace with `config`. Fails with [`Error::AlreadyExists`] if it exists.
    pub async fn create(&self, name: &NamespaceName, config: DatabaseConfig) -> Result<(), Error> {
        self.check_running()?;
        self.primary_only(name)?;
        if !self.namespaces_enabled() && name.as_str() != NamespaceName::DEFAULT {
            return Err(Error::NamespacesDisabled);
        }
        let slot = self.slot(name);
        let mut guard = slot.ns.lock().await;
        if guard.is_some() {
            return Err(Error::AlreadyExists(name.clone()));
        }
        let inner = self.inner.clone();
        let name2 = name.clone();
        let key = config.jwt_key.clone();
        let ns = blocking::run(move || inner.create_on_disk(name2, config)).await.map_err(internal)??;
        self.set_jwt_key(name, key);
        *guard = Some(Arc::new(ns));
        self.inner.loaded.fetch_add(1, Ordering::AcqRel);
        drop(guard);
        tracing::info!(namespace = %name, "namespace created");
        self.evict_idle(Some(name)).await;
        Ok(())
    }

    /// Closes and deletes a namespace and its configuration.
    pub async fn destroy(&self, name: &NamespaceName) -> Result<(), Error> {
        self.check_running()?;
        self.primary_only(name)?;
        if name.as_str() == NamespaceName::DEFAULT {
            return Err(Error::DefaultNamespace);
        }
        let slot = self.slot(name);
        let mut guard = slot.ns.lock().await;
        let loaded = guard.take();
        if loaded.is_some() {
            self.inner.loaded.fetch_sub(1, Ordering::AcqRel);
        }
        let inner = self.inner.clone();
        let name2 = name.clone();
        let result = blocking::run(move || {
            if let Some(ns) = loaded {
                ns.deleted.store(true, Ordering::Release);
                if let Err(e) = ns.close() {
                    tracing::warn!(namespace = %ns.name, error = %e, "closing a namespace being deleted failed");
                }
            }
            inner.destroy_on_disk(&name2)
        })
        .await
        .map_err(internal)?;
        self.forget_slot_if_unused(name, &slot);
        if result.is_ok() {
            self.set_jwt_key(name, None);
        }
        drop(guard);
        result?;
        tracing::info!(namespace = %name, "namespace deleted");
        Ok(())
    }

    /// Every namespace on disk, sorted by name.
    pub async fn list(&self) -> Result<Vec<NamespaceName>, Error> {
        let dbs_dir = self.inner.dbs_dir.clone();
        blocking::run(move || {
            let entries = std::fs::read_dir(&dbs_dir).map_err(|source| Error::Io {
                name: NamespaceName::default_namespace(),
                path: dbs_dir.clone(),
                source,
            })?;
            let mut names: Vec<_> = entries
                .filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .filter_map(|e| NamespaceName::new(e.file_name().to_string_lossy().into_owned()).ok())
                .collect();
            names.sort();
            Ok(names)
        })
        .await
        .map_err(internal)?
    }

    pub async fn config(&self, name: &NamespaceName) -> Result<Arc<DatabaseConfig>, Error> {
        Ok(self.get(name).await?.db().config())
    }

    /// Changes the configuration with `update`, under the namespace's lock so concurrent
    /// changes do not overwrite each other; stores it durably, then makes it the one every
    /// connection obeys. Returns the new configuration.
    pub async fn update_config(
        &self,
        name: &NamespaceName,
        update: impl FnOnce(DatabaseConfig) -> DatabaseConfig + Send + 'static,
    ) -> Result<DatabaseConfig, Error> {
        self.check_running()?;
        self.primary_only(name)?;
        let slot = self.slot(name);
        let mut guard = slot.ns.lock().await;
        let ns = self.load_locked(name, &slot, &mut guard).await?;
        let meta = self.inner.meta.clone();
        let config = blocking::run(move || -> Result<DatabaseConfig, Error> {
            let config = update((*ns.db().config()).clone());
            meta.put(ns.name(), &config)?;
            ns.db().set_config(config.clone());
            Ok(config)
        })
        .await
        .map_err(internal)??;
        self.set_jwt_key(name, config.jwt_key.clone());
        Ok(config)
    }

    /// The namespace's own `jwt_key`, if it has one (see `Inner::jwt_keys`).
    pub fn jwt_key(&self, name: &NamespaceName) -> Option<Arc<str>> {
        self.inner.jwt_keys.read().unwrap_or_else(|e| e.into_inner()).get(name).cloned()
    }

    fn set_jwt_key(&self, name: &NamespaceName, key: Option<String>) {
        let mut keys = self.inner.jwt_keys.write().unwrap_or_else(|e| e.into_inner());
        match key.filter(|k| !k.is_empty()) {
            Some(key) => keys.insert(name.clone(), Arc::from(key)),
            None => keys.remove(name),
        };
    }

    /// Moves the namespace's SQLite WAL into its data file.
    pub async fn checkpoint(&self, name: &NamespaceName) -> Result<(), Error> {
        let ns = self.get(name).await?;
        blocking::run(move || ns.db().checkpoint(CheckpointMode::Truncate).map(|_| ()).map_err(|e| ns.database_error(e)))
            .await
            .map_err(internal)?
    }

    pub async fn stats(&self, name: &NamespaceName) -> Result<NamespaceStats, Error> {
        let ns = self.get(name).await?;
        blocking::run(move || {
            let (data_file_bytes, wal_file_bytes) = ns.db().file_sizes();
            let config = ns.db().config();
            NamespaceStats {
                namespace: ns.name().to_string(),
                data_file_bytes,
                wal_file_bytes,
                block_reads: config.block_reads,
                block_writes: config.block_writes,
                replication: ns.db().logger().map(|logger| logger.stats()),
                replica: ns.replica().map(|copy| ReplicaStats::of(&copy.progress())),
            }
        })
        .await
        .map_err(internal)
    }

    /// The open namespaces nobody is locking.
    fn unlocked_loaded(&self) -> Vec<Arc<Namespace>> {
        let slots: Vec<_> = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        slots.iter().filter_map(|slot| slot.ns.try_lock().ok().and_then(|g| g.clone())).collect()
    }

    /// Closes, in every open namespace, the idle connections past its own that went unused
    /// for a while (the periodic sweep that gives the shared idle budget back).
    pub async fn expire_idle_connections(&self) {
        let loaded = self.unlocked_loaded();
        if let Err(e) = blocking::run(move || loaded.iter().for_each(|ns| ns.db().expire_idle())).await {
            tracing::warn!(error = %e, "closing unused idle connections failed");
        }
    }

    /// Checkpoints every open namespace nobody is locking (the periodic checkpoint).
    pub async fn checkpoint_loaded(&self) {
        for ns in self.unlocked_loaded() {
            let name = ns.name().clone();
            match blocking::run(move || ns.db().checkpoint(CheckpointMode::Passive)).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(namespace = %name, error = %e, "periodic checkpoint failed")
                }
                Err(e) => {
                    tracing::warn!(namespace = %name, error = %e, "periodic checkpoint failed")
                }
            }
        }
    }

    /// How many namespaces are open right now.
    pub fn loaded_count(&self) -> usize {
        self.inner.loaded.load(Ordering::Acquire)
    }

    /// Refuses new work and closes every namespace cleanly (checkpointed).
    pub async fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::Release);
        if let Some(replicas) = &self.inner.replicas {
            replicas.stop_all();
        }
        let slots: Vec<_> = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        for slot in slots {
            let mut guard = slot.ns.lock().await;
            if let Some(ns) = guard.take() {
                self.inner.loaded.fetch_sub(1, Ordering::AcqRel);
                let name = ns.name().clone();
                match blocking::run(move || ns.close()).await {
                    Ok(Ok(())) => tracing::debug!(namespace = %name, "namespace closed"),
                    Ok(Err(e)) => {
                        tracing::error!(namespace = %name, error = %e, "closing namespace failed")
                    }
                    Err(e) => {
                        tracing::error!(namespace = %name, error = %e, "closing namespace failed")
                    }
                }
            }
        }
    }

    fn check_running(&self) -> Result<(), Error> {
        if self.inner.shutting_down.load(Ordering::Acquire) {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    fn slot(&self, name: &NamespaceName) -> Arc<Slot> {
        let slot = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner()).entry(name.clone()).or_default().clone();
        slot.last_used.store(self.inner.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        slot
    }

    /// Drops the slot of a namespace that is not loaded, so the map does not grow with every
    /// name ever asked for. Called with the slot locked; nobody else may hold the slot, since
    /// a second holder could load into a slot the map no longer knows.
    fn forget_slot_if_unused(&self, name: &NamespaceName, slot: &Arc<Slot>) {
        let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.get(name).is_some_and(|s| Arc::ptr_eq(s, slot)) && Arc::strong_count(slot) == 2 {
            slots.remove(name);
        }
    }

    /// With the slot locked: the loaded namespace, loading it if needed.
    async fn load_locked(&self, name: &NamespaceName, slot: &Arc<Slot>, guard: &mut SlotGuard<'_>) -> Result<Arc<Namespace>, Error> {
        if let Some(ns) = guard.as_ref() {
            return Ok(ns.clone());
        }
        let copy = match &self.inner.replicas {
            Some(replicas) => Some(replicas.copy(name, &self.inner.dir_of(name)).await?),
            None => None,
        };
        let inner = self.inner.clone();
        let name2 = name.clone();
        let loaded = blocking::run(move || inner.load_from_disk(name2, copy)).await.map_err(internal)?;
        match loaded {
            Ok(ns) => {
                let ns = Arc::new(ns);
                **guard = Some(ns.clone());
                self.inner.loaded.fetch_add(1, Ordering::AcqRel);
                tracing::debug!(namespace = %name, "namespace loaded");
                Ok(ns)
            }
            Err(e) => {
                self.forget_slot_if_unused(name, slot);
                Err(e)
            }
        }
    }

    /// Closes idle namespaces past `--max-active-namespaces` (after streams that held them
    /// ended, say). Returns at once if another trim is running.
    pub async fn trim(&self) {
        if self.inner.trimming.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Lowers the flag however the trim ends (a panic included).
        struct Done<'a>(&'a AtomicBool);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        let _done = Done(&self.inner.trimming);
        self.evict_idle(None).await;
    }

    /// Closes least recently used namespaces that nobody is using until at most
    /// `max_active` are open. Namespaces in use stay open, even past the limit.
    async fn evict_idle(&self, keep: Option<&NamespaceName>) {
        while self.inner.loaded.load(Ordering::Acquire) > self.inner.settings.max_active {
            let mut candidates: Vec<(u64, NamespaceName, Arc<Slot>)> = {
                let slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
                slots
                    .iter()
                    .filter(|(name, _)| Some(*name) != keep)
                    .map(|(name, slot)| (slot.last_used.load(Ordering::Relaxed), name.clone(), slot.clone()))
                    .collect()
            };
            candidates.sort_by_key(|(used, _, _)| *used);
            let mut evicted = false;
            for (_, name, slot) in candidates {
                let Ok(mut guard) = slot.ns.try_lock() else {
                    continue;
                };
                // One reference is the slot's own: anything more is a request or stream.
                if guard.as_ref().is_none_or(|ns| Arc::strong_count(ns) != 1) {
                    continue;
                }
                let ns = guard.take().expect("checked above");
                self.inner.loaded.fetch_sub(1, Ordering::AcqRel);
                match blocking::run(move || ns.close()).await {
                    Ok(Ok(())) => tracing::debug!(namespace = %name, "idle namespace closed"),
                    Ok(Err(e)) => {
                        tracing::warn!(namespace = %name, error = %e, "closing idle namespace failed")
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %name, error = %e, "closing idle namespace failed")
                    }
                }
                if let Some(replicas) = &self.inner.replicas {
                    replicas.stop(&name);
                }
                drop(guard);
                self.forget_slot_if_unused(&name, &slot);
                evicted = true;
                break;
            }
            if !evicted {
                break;
            }
        }
    }
}

impl Inner {
    fn dir_of(&self, name: &NamespaceName) -> PathBuf {
        self.dbs_dir.join(name.as_str())
    }

    fn load_from_disk(&self, name: NamespaceName, copy: Option<super::ReplicaCopy>) -> Result<Namespace, Error> {
        let dir = self.dir_of(&name);
        if !dir.is_dir() {
            return Err(Error::NotFound(name));
        }
        let config = self.meta.get(&name)?;
        match copy {
            Some(copy) => Namespace::open_replica(name, dir, config, copy, &self.settings),
            None => Namespace::open(name, dir, config, &self.settings),
        }
    }

    fn create_on_disk(&self, name: NamespaceName, config: DatabaseConfig) -> Result<Namespace, Error> {
        let dir = self.dir_of(&name);
        let io = |source| Error::Io { name: name.clone(), path: dir.clone(), source };
        if dir.exists() {
            return Err(Error::AlreadyExists(name));
        }
        // Configuration first: a crash before the directory exists leaves no namespace, and
        // the next create overwrites the orphaned configuration.
        self.meta.put(&name, &config)?;
        match std::fs::create_dir(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(Error::AlreadyExists(name)),
            other => other.map_err(io)?,
        }
        durable::sync_dir(&self.dbs_dir).map_err(io)?;
        match Namespace::open(name.clone(), dir.clone(), config, &self.settings) {
            Ok(ns) => Ok(ns),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn destroy_on_disk(&self, name: &NamespaceName) -> Result<(), Error> {
        let dir = self.dir_of(name);
        let io = |path: &Path, source| Error::Io { name: name.clone(), path: path.to_owned(), source };
        if !dir.is_dir() {
            return Err(Error::NotFound(name.clone()));
        }
        // Rename first, so a crash halfway through removing files never leaves a namespace
        // that exists with part of its files; the start-up scan finishes the removal.
        let doomed = self.dbs_dir.join(format!("{DELETING_PREFIX}{}-{}", name, uuid::Uuid::new_v4().simple()));
        std::fs::rename(&dir, &doomed).map_err(|e| io(&dir, e))?;
        durable::sync_dir(&self.dbs_dir).map_err(|e| io(&self.dbs_dir, e))?;
        self.meta.remove(name)?;
        std::fs::remove_dir_all(&doomed).map_err(|e| io(&doomed, e))?;
        Ok(())
    }
}

/// Finishes deletions a crash interrupted.
fn remove_interrupted_deletions(dbs_dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dbs_dir) else {
        return;
    };
    for entry in entries.filter_map(|e| e.ok()) {
        if entry.file_name().to_string_lossy().starts_with(DELETING_PREFIX) {
            if let Err(e) = std::fs::remove_dir_all(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not finish an interrupted namespace deletion");
            }
        }
    }
}

fn internal(e: blocking::Panicked) -> Error {
    Error::Internal(e.to_string())
}
