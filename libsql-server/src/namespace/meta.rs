//! The metastore: every namespace's configuration, in `metastore/data`, laid out as the libSQL
//! server lays it out (`namespace_configs(namespace, config)` holding a protobuf
//! `DatabaseConfig`), so a data directory moved over keeps its configurations.

use std::path::Path;
use std::sync::Mutex;

use libsql_replication::rpc::metadata::DatabaseConfig;
use libsql_sys::rusqlite::{self, OptionalExtension};
use prost::Message;

use super::NamespaceName;

pub struct MetaStore {
    conn: Mutex<rusqlite::Connection>,
}

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metastore: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("metastore: {0}")]
    Io(#[from] std::io::Error),
    #[error("metastore holds an undecodable configuration for {namespace}: {source}")]
    Decode { namespace: String, source: prost::DecodeError },
}

impl MetaStore {
    /// Opens `dir/data`, creating the directory and table if needed. Blocking.
    pub fn open(dir: &Path) -> Result<Self, MetaError> {
        std::fs::create_dir_all(dir)?;
        let conn = rusqlite::Connection::open(dir.join("data"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch("CREATE TABLE IF NOT EXISTS namespace_configs (namespace TEXT PRIMARY KEY, config BLOB)")?;
        Ok(MetaStore { conn: Mutex::new(conn) })
    }

    /// The stored configuration of `name`, or the default one if none was stored.
    pub fn get(&self, name: &NamespaceName) -> Result<DatabaseConfig, MetaError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let blob: Option<Vec<u8>> = conn
            .query_row("SELECT config FROM namespace_configs WHERE namespace = ?", [name.as_str()], |r| r.get(0))
            .optional()?;
        match blob {
            None => Ok(DatabaseConfig::default()),
            Some(bytes) => DatabaseConfig::decode(bytes.as_slice())
                .map_err(|source| MetaError::Decode { namespace: name.to_string(), source }),
        }
    }

    /// Every namespace with a stored configuration.
    pub fn names(&self) -> Result<Vec<String>, MetaError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut stmt = conn.prepare("SELECT namespace FROM namespace_configs")?;
        let names = stmt.query_map([], |r| r.get::<_, String>(0))?.collect::<Result<_, _>>()?;
        Ok(names)
    }

    /// Every namespace whose stored configuration names a `jwt_key`, with it.
    pub fn jwt_keys(&self) -> Result<Vec<(String, String)>, MetaError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let mut stmt = conn.prepare("SELECT namespace, config FROM namespace_configs")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut keys = Vec::new();
        for row in rows {
            let (namespace, bytes) = row?;
            let config = DatabaseConfig::decode(bytes.as_slice()).map_err(|source| MetaError::Decode { namespace: namespace.clone(), source })?;
            if let Some(key) = config.jwt_key.filter(|k| !k.is_empty()) {
                keys.push((namespace, key));
            }
        }
        Ok(keys)
    }

    pub fn put(&self, name: &NamespaceName, config: &DatabaseConfig) -> Result<(), MetaError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.execute(
            "INSERT INTO namespace_configs (namespace, config) VALUES (?1, ?2)
             ON CONFLICT (namespace) DO UPDATE SET config = excluded.config",
            rusqlite::params![name.as_str(), config.encode_to_vec()],
        )?;
        Ok(())
    }

    pub fn remove(&self, name: &NamespaceName) -> Result<(), MetaError> {
        let conn = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        conn.execute("DELETE FROM namespace_configs WHERE namespace = ?", [name.as_str()])?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configurations_survive_reopening_and_unknown_namespaces_get_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let name = NamespaceName::new("t1").unwrap();
        let config = DatabaseConfig { block_writes: true, block_reason: Some("maintenance".into()), ..Default::default() };
        MetaStore::open(dir.path()).unwrap().put(&name, &config).unwrap();

        let store = MetaStore::open(dir.path()).unwrap();
        assert_eq!(store.get(&name).unwrap(), config);
        assert_eq!(store.get(&NamespaceName::new("other").unwrap()).unwrap(), DatabaseConfig::default());
        store.remove(&name).unwrap();
        assert_eq!(store.get(&name).unwrap(), DatabaseConfig::default());
    }
}
