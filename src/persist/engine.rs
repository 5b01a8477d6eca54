//! The durable tier behind a small trait, and its sled implementation.
//!
//! The store and the HTTP layer never see this trait; the write-back worker
//! and recovery use it. Another engine can be added by implementing
//! [`Engine`] alone.
//!
//! # Layout in sled
//! - tree `meta`: `format_version` (u32 BE), `revision` (u64 BE, the highest
//!   entry version handed out when last saved).
//! - tree `tables`: table name → [`super::codec::StoredTable`] JSON.
//! - tree `data/<name>`: key bytes → record ([`super::codec`]).

use std::path::Path;

use super::PersistError;

/// One change to write: a key and its new record, or `None` to remove it.
pub type Change = (Vec<u8>, Option<Vec<u8>>);

/// A visitor of stored `(key, record)` pairs; its error stops the walk.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), PersistError> + 'a;

/// What the durable tier must do.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// A value from the metadata space.
    ///
    /// # Errors
    /// [`PersistError::Io`].
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, PersistError>;
    /// Sets a value in the metadata space (durable after [`Engine::flush`]).
    ///
    /// # Errors
    /// [`PersistError::Io`].
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), PersistError>;
    /// Every stored table definition as `(name, bytes)`.
    ///
    /// # Errors
    /// [`PersistError::Io`].
    fn table_defs(&self) -> Result<Vec<(String, Vec<u8>)>, PersistError>;
    /// Stores a table definition.
    ///
    /// # Errors
    /// [`PersistError::Io`].
    fn put_table_def(&self, name: &str, def: &[u8]) -> Result<(), PersistError>;
    /// Removes a table's definition, then its data.
    ///
    /// # Errors
    /// [`PersistError::Io`].
    fn remove_table(&self, name: &str) -> Result<(), PersistError>;
    /// Names of tables that have a data space, with or without a definition.
    ///
    /// # Errors
    /// [`PersistError::Io`].
    fn data_spaces(&self) -> Result<Vec<String>, PersistError>;
    /// Applies changes to a table's data atomically.
    ///
    /// # Errors
    /// [`PersistError::Io`].
    fn write(&self, table: &str, changes: Vec<Change>) -> Result<(), PersistError>;
    /// Calls `f` with every `(key, record)` of a table.
    ///
    /// # Errors
    /// [`PersistError::Io`], or what `f` returns.
    fn for_each(&self, table: &str, f: &mut Visitor<'_>) -> Result<(), PersistError>;
    /// Makes everything written so far durable (fsync).
    ///
    /// # Errors
    /// [`PersistError::Io`].
    fn flush(&self) -> Result<(), PersistError>;
}

/// [`Engine`] on a sled database.
#[derive(Debug)]
pub struct SledEngine {
    db: sled::Db,
    meta: sled::Tree,
    tables: sled::Tree,
}

const DATA_PREFIX: &str = "data/";

fn io(e: sled::Error) -> PersistError {
    PersistError::Io(e.to_string())
}

impl SledEngine {
    /// Opens (creating if needed) the database in `dir`.
    ///
    /// # Errors
    /// [`PersistError::Open`] with the cause: another process holds the
    /// directory, permission denied, or corrupt files.
    pub fn open(dir: &Path) -> Result<Self, PersistError> {
        // sled's worker threads can hold the directory lock for a moment after
        // the database that owned it is dropped (in this process, or in one
        // that just exited); only a lock held for longer is another larder.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            // No background flusher: every write-back round, definition
            // change, migration and shutdown flushes explicitly, and the
            // flusher thread's clone of the database would hold the lock.
            let opened = sled::Config::new()
                .path(dir)
                .mode(sled::Mode::HighThroughput)
                .flush_every_ms(None)
                .open();
            match opened {
                Ok(db) => break db,
                Err(e) if is_lock_error(&e) && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(PersistError::Open(open_cause(&e))),
            }
        };
        let meta = db.open_tree("meta").map_err(io)?;
        let tables = db.open_tree("tables").map_err(io)?;
        Ok(SledEngine { db, meta, tables })
    }

    fn data(&self, table: &str) -> Result<sled::Tree, PersistError> {
        self.db
            .open_tree(format!("{DATA_PREFIX}{table}"))
            .map_err(io)
    }
}

/// How long a held directory lock is waited for before it is reported.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("lock"))
}

fn open_cause(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            "permission denied".into()
        }
        e if is_lock_error(e) => "it is in use by another larder process".into(),
        sled::Error::Corruption { .. } => "its files are corrupt".into(),
        other => other.to_string(),
    }
}

impl Engine for SledEngine {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, PersistError> {
        Ok(self.meta.get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), PersistError> {
        self.meta.insert(key, value).map_err(io)?;
        Ok(())
    }

    fn table_defs(&self) -> Result<Vec<(String, Vec<u8>)>, PersistError> {
        self.tables
            .iter()
            .map(|kv| {
                let (k, v) = kv.map_err(io)?;
                Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
            })
            .collect()
    }

    fn put_table_def(&self, name: &str, def: &[u8]) -> Result<(), PersistError> {
        self.tables.insert(name, def).map_err(io)?;
        Ok(())
    }

    fn remove_table(&self, name: &str) -> Result<(), PersistError> {
        // Definition first: a crash in between leaves a data space with no
        // definition, which start-up removes, never a table that comes back.
        self.tables.remove(name).map_err(io)?;
        self.db
            .drop_tree(format!("{DATA_PREFIX}{name}"))
            .map_err(io)?;
        Ok(())
    }

    fn data_spaces(&self) -> Result<Vec<String>, PersistError> {
        Ok(self
            .db
            .tree_names()
            .into_iter()
            .filter_map(|n| {
                std::str::from_utf8(&n)
                    .ok()
                    .and_then(|s| s.strip_prefix(DATA_PREFIX))
                    .map(str::to_owned)
            })
            .collect())
    }

    fn write(&self, table: &str, changes: Vec<Change>) -> Result<(), PersistError> {
        let tree = self.data(table)?;
        let mut batch = sled::Batch::default();
        for (key, record) in changes {
            match record {
                Some(r) => batch.insert(key, r),
                None => batch.remove(key),
            }
        }
        tree.apply_batch(batch).map_err(io)
    }

    fn for_each(&self, table: &str, f: &mut Visitor<'_>) -> Result<(), PersistError> {
        for kv in self.data(table)?.iter() {
            let (k, v) = kv.map_err(io)?;
            f(&k, &v)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), PersistError> {
        self.db.flush().map_err(io).map(|_| ())
    }
}
