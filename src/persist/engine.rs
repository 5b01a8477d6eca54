//! The durable tier behind a small trait, and its sled implementation.
//!
//! Over 600 lines because the engine's pieces are one unit: the trait, the
//! sled engine, and the real-flush bookkeeping (blob files and directories
//! to sync) share private state, and each step's order matters.
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
//!
//! # What a flush promises
//! sled 0.34 "flushes" with `sync_file_range`, which starts and waits for the
//! write-out of its log but neither flushes the drive's volatile write cache
//! nor writes the file's metadata, and gives no integrity guarantee on
//! copy-on-write filesystems. [`SledEngine::flush`] therefore follows sled's
//! flush with real syncs: `fdatasync` of every blob file sled created since
//! the last flush (large values and pages live in `blobs/`), then of the log
//! file `db`, and an `fsync` of each directory whose entries changed (new
//! blobs, snapshots renamed into place). Only after all of them returns is a
//! `sync` write acknowledged.
//!
//! # The lock file
//! `larder.lock` in the data directory is held with an exclusive advisory
//! lock for as long as the engine lives, so a second larder on the same
//! directory is refused with a clear message instead of whatever sled says.

use std::path::Path;

use super::PersistError;

/// One change to write: a key and its new record, or `None` to remove it.
pub type Change = (Vec<u8>, Option<Vec<u8>>);

/// A visitor of stored `(key, record)` pairs; its error stops the walk.
pub type Visitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), PersistError> + 'a;

/// A visitor of metadata `(key, value)` pairs; its error stops the walk.
pub type MetaVisitor<'a> = dyn FnMut(&str, &[u8]) -> Result<(), PersistError> + 'a;

/// Wraps the durable engine when the server is built, for example to record
/// every write and flush it receives.
pub type EngineWrapper =
    Box<dyn FnOnce(std::sync::Arc<dyn Engine>) -> std::sync::Arc<dyn Engine> + Send>;

/// What the durable tier must do.
pub trait Engine: Send + Sync + std::fmt::Debug {
    /// A value from the metadata space.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, PersistError>;
    /// Sets a value in the metadata space (durable after [`Engine::flush`]).
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), PersistError>;
    /// Removes a value from the metadata space (durable after
    /// [`Engine::flush`]).
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn remove_meta(&self, key: &str) -> Result<(), PersistError>;
    /// Every metadata value whose key starts with `prefix`.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn metas(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, PersistError>;
    /// Calls `f` with every metadata value whose key starts with `prefix`,
    /// one at a time (by default from [`Engine::metas`]; engines that can
    /// walk without collecting everything first should).
    ///
    /// # Errors
    /// [`PersistError::Engine`], or what `f` returns.
    fn for_each_meta(&self, prefix: &str, f: &mut MetaVisitor<'_>) -> Result<(), PersistError> {
        for (k, v) in self.metas(prefix)? {
            f(&k, &v)?;
        }
        Ok(())
    }
    /// Every stored table definition as `(name, bytes)`.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn table_defs(&self) -> Result<Vec<(String, Vec<u8>)>, PersistError>;
    /// Stores a table definition.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn put_table_def(&self, name: &str, def: &[u8]) -> Result<(), PersistError>;
    /// Removes a table's definition, then its data.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn remove_table(&self, name: &str) -> Result<(), PersistError>;
    /// Names of tables that have a data space, with or without a definition.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn data_spaces(&self) -> Result<Vec<String>, PersistError>;
    /// Applies changes to a table's data atomically.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn write(&self, table: &str, changes: Vec<Change>) -> Result<(), PersistError>;
    /// Calls `f` with every `(key, record)` of a table.
    ///
    /// # Errors
    /// [`PersistError::Engine`], or what `f` returns.
    fn for_each(&self, table: &str, f: &mut Visitor<'_>) -> Result<(), PersistError>;
    /// The record stored under `key` in a table's data, if any.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, PersistError> {
        let mut found = None;
        self.for_each_prefixed(table, key, &mut |k, v| {
            if k == key {
                found = Some(v.to_vec());
            }
            Ok(())
        })?;
        Ok(found)
    }
    /// Calls `f` with every `(key, record)` of a table whose key starts
    /// with `prefix` (by default a walk of the whole table; engines that
    /// keep keys in order should seek).
    ///
    /// # Errors
    /// [`PersistError::Engine`], or what `f` returns.
    fn for_each_prefixed(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut Visitor<'_>,
    ) -> Result<(), PersistError> {
        self.for_each(table, &mut |k, v| {
            if k.starts_with(prefix) {
                f(k, v)?;
            }
            Ok(())
        })
    }
    /// Whether the disk has room for `bytes` more (with whatever the engine
    /// keeps in reserve); checked before every write, so that a full disk
    /// refuses a round up front rather than failing the engine part-way.
    ///
    /// # Errors
    /// [`PersistError::File`] with `ENOSPC`.
    fn has_room(&self, bytes: usize) -> Result<(), PersistError> {
        let _ = bytes;
        Ok(())
    }
    /// Gets ready to write again after a failure (an engine whose errors
    /// stick until it is reopened reopens here); by default nothing.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn reopen(&self) -> Result<(), PersistError> {
        Ok(())
    }
    /// Makes everything written so far durable: when it returns, the data
    /// has been through `fdatasync`/`fsync`, not only handed to the OS.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    fn flush(&self) -> Result<(), PersistError>;
}

/// [`Engine`] on a sled database.
#[derive(Debug)]
pub struct SledEngine {
    sled: Sled,
    dir: std::path::PathBuf,
    syncer: DirSyncer,
    /// Held (locked) for the engine's life; see "The lock file".
    _lock: std::fs::File,
}

/// A sled database and the trees every call uses.
#[derive(Debug)]
struct Sled {
    db: sled::Db,
    meta: sled::Tree,
    tables: sled::Tree,
}

const DATA_PREFIX: &str = "data/";
/// sled's page cache unless configured (`--sled-cache-bytes`). larder's own
/// store holds every live object in memory already, and sled's pages are
/// read only at start-up and when a write-back round updates a page that
/// was evicted (from the OS page cache, as a rule). Measured with 1M
/// entries: a periodic table took 8 / 16 / 32 / 64 MiB of cache to 351 /
/// 369 / 399 / 448 MB resident, and sync PUTs over those 1M keys ran no
/// slower at 16 MiB than at 64 (18.5k and 16.2k req/s). sled's own default
/// (1 GiB) kept a second copy of every durable table in memory.
pub const DEFAULT_SLED_CACHE_BYTES: u64 = 16 * 1024 * 1024;

/// Room kept free on the data directory's disk beyond twice what a batch
/// writes: sled appends to its log in segments and fails for good (until
/// the process restarts) if the disk fills under it, so writes are refused
/// with `ENOSPC` before that can happen.
pub const DISK_RESERVE: u64 = 4 * 1024 * 1024;

/// Bytes an unprivileged process may still write on the disk of `dir`.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: statvfs writes only into the struct passed by pointer,
        // which lives on this frame, and reads the NUL-terminated path.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(u64::MAX)
    }
}

/// Name of the lock file in the data directory.
pub const LOCK_FILE: &str = "larder.lock";

fn io(e: sled::Error) -> PersistError {
    PersistError::Engine(e)
}

fn os(what: &'static str, path: &Path, source: std::io::Error) -> PersistError {
    PersistError::File {
        what,
        path: path.to_owned(),
        source,
    }
}

impl SledEngine {
    /// Opens (creating if needed) the database in `dir`.
    ///
    /// # Errors
    /// [`PersistError::Open`] with the cause: another process holds the
    /// directory, permission denied, or corrupt files.
    pub fn open(dir: &Path) -> Result<Self, PersistError> {
        Self::open_with_cache(dir, DEFAULT_SLED_CACHE_BYTES)
    }

    /// Like [`SledEngine::open`], with sled's page cache bounded to
    /// `cache_bytes`.
    ///
    /// # Errors
    /// As [`SledEngine::open`].
    pub fn open_with_cache(dir: &Path, cache_bytes: u64) -> Result<Self, PersistError> {
        let lock = hold_lock(dir)?;
        let sled = open_sled(dir, cache_bytes)?;
        let syncer = DirSyncer::new(dir);
        // Files sled created at open (and the directory itself, if new)
        // must survive a power cut as surely as what is later written.
        syncer
            .sync_all()
            .map_err(|e| PersistError::Open(e.to_string()))?;
        Ok(SledEngine {
            sled,
            dir: dir.to_owned(),
            syncer,
            _lock: lock,
        })
    }

    /// Runs `f` on the database.
    fn with<T>(&self, f: impl FnOnce(&Sled) -> Result<T, PersistError>) -> Result<T, PersistError> {
        f(&self.sled)
    }

    fn data(&self, table: &str) -> Result<sled::Tree, PersistError> {
        self.with(|s| s.data(table))
    }
}

/// Opens sled in `dir` (our own lock already held).
fn open_sled(dir: &Path, cache_bytes: u64) -> Result<Sled, PersistError> {
    {
        // Our lock is held, so no other larder uses the directory; sled's
        // own lock can still be held for a moment by the worker threads of
        // a database this process just dropped. sled reports that only as
        // text (ErrorKind::Other), hence the match on it for this retry;
        // what a user sees about another process comes from our lock file.
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        let db = loop {
            // No background flusher: every write-back round, definition
            // change, migration and shutdown flushes explicitly, and the
            // flusher thread's clone of the database would hold the lock.
            let opened = sled::Config::new()
                .path(dir)
                .cache_capacity(cache_bytes)
                .mode(sled::Mode::HighThroughput)
                .flush_every_ms(None)
                .open();
            match opened {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if (e.kind() == std::io::ErrorKind::WouldBlock
                        || e.to_string().contains("lock"))
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(PersistError::Open(open_cause(&e))),
            }
        };
        let meta = db.open_tree("meta").map_err(io)?;
        let tables = db.open_tree("tables").map_err(io)?;
        Ok(Sled { db, meta, tables })
    }
}

impl Sled {
    fn data(&self, table: &str) -> Result<sled::Tree, PersistError> {
        self.db
            .open_tree(format!("{DATA_PREFIX}{table}"))
            .map_err(io)
    }
}

/// Takes the data directory's lock file, or says who has it.
fn hold_lock(dir: &Path) -> Result<std::fs::File, PersistError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        PersistError::Open(match e.kind() {
            std::io::ErrorKind::PermissionDenied => "permission denied".into(),
            _ => e.to_string(),
        })
    })?;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| {
            PersistError::Open(match e.kind() {
                std::io::ErrorKind::PermissionDenied => "permission denied".into(),
                _ => format!("cannot open {}: {e}", path.display()),
            })
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(PersistError::Open(
            "it is in use by another larder process".into(),
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(PersistError::Open(format!(
            "cannot lock {}: {e}",
            path.display()
        ))),
    }
}

/// How long sled's own directory lock is waited for after ours was taken.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_cause(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => {
            "permission denied".into()
        }
        sled::Error::Corruption { .. } => "its files are corrupt".into(),
        other => other.to_string(),
    }
}

/// Makes sled's files durable: the part of a flush that sled leaves out.
///
/// # Locking
/// `state` is held for a whole [`DirSyncer::sync_after_flush`], so two
/// flushes never interleave their bookkeeping; flushes are rare and already
/// serialized by the write-back round lock.
#[derive(Debug)]
struct DirSyncer {
    dir: std::path::PathBuf,
    state: std::sync::Mutex<SyncState>,
}

#[derive(Debug, Default)]
struct SyncState {
    /// Entries of the data directory when it was last fsynced.
    top: std::collections::BTreeSet<std::ffi::OsString>,
    /// Blob files already fdatasynced (sled never rewrites a blob).
    blobs: std::collections::BTreeSet<std::ffi::OsString>,
    /// The log file, kept open for its fdatasync.
    log: Option<std::fs::File>,
}

impl DirSyncer {
    fn new(dir: &Path) -> Self {
        DirSyncer {
            dir: dir.to_owned(),
            state: std::sync::Mutex::default(),
        }
    }

    /// Everything, as at open: every file, both directories, and the parent
    /// (which holds the data directory's own entry).
    fn sync_all(&self) -> Result<(), PersistError> {
        for entry in std::fs::read_dir(&self.dir).map_err(|e| os("cannot list", &self.dir, e))? {
            let entry = entry.map_err(|e| os("cannot list", &self.dir, e))?;
            let path = entry.path();
            if path.is_file() {
                sync_file(&path)?;
            }
        }
        self.sync_after_flush()?;
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }

    /// After sled's flush: new blob files and the blob directory, the log
    /// file, then the data directory if its entries changed.
    fn sync_after_flush(&self) -> Result<(), PersistError> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let blob_dir = self.dir.join("blobs");
        if blob_dir.is_dir() {
            let now = list(&blob_dir)?;
            let mut new_blob = false;
            for name in now.difference(&state.blobs) {
                match sync_file(&blob_dir.join(name)) {
                    Ok(()) => new_blob = true,
                    // Collected by sled between our listing and our sync.
                    Err(_) if !blob_dir.join(name).exists() => {}
                    Err(e) => return Err(e),
                }
            }
            if new_blob || now.len() != state.blobs.len() {
                sync_dir(&blob_dir)?;
            }
            state.blobs = now;
        }
        if state.log.is_none() {
            let path = self.dir.join("db");
            state.log = Some(std::fs::File::open(&path).map_err(|e| os("cannot open", &path, e))?);
        }
        if let Some(log) = &state.log {
            log.sync_data()
                .map_err(|e| os("fdatasync failed on", &self.dir.join("db"), e))?;
        }
        let top = list(&self.dir)?;
        if top != state.top {
            sync_dir(&self.dir)?;
            state.top = top;
        }
        Ok(())
    }
}

fn list(dir: &Path) -> Result<std::collections::BTreeSet<std::ffi::OsString>, PersistError> {
    std::fs::read_dir(dir)
        .map_err(|e| os("cannot list", dir, e))?
        .map(|e| {
            e.map(|e| e.file_name())
                .map_err(|e| os("cannot list", dir, e))
        })
        .collect()
}

fn sync_file(path: &Path) -> Result<(), PersistError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_data())
        .map_err(|e| os("fdatasync failed on", path, e))
}

fn sync_dir(path: &Path) -> Result<(), PersistError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| os("fsync failed on", path, e))
}

impl Engine for SledEngine {
    fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, PersistError> {
        self.with(|s| Ok(s.meta.get(key).map_err(io)?.map(|v| v.to_vec())))
    }

    fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), PersistError> {
        self.with(|s| {
            s.meta.insert(key, value).map_err(io)?;
            Ok(())
        })
    }

    fn remove_meta(&self, key: &str) -> Result<(), PersistError> {
        self.with(|s| {
            s.meta.remove(key).map_err(io)?;
            Ok(())
        })
    }

    fn metas(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, PersistError> {
        self.with(|s| {
            s.meta
                .scan_prefix(prefix)
                .map(|kv| {
                    let (k, v) = kv.map_err(io)?;
                    Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
                })
                .collect()
        })
    }

    fn for_each_meta(&self, prefix: &str, f: &mut MetaVisitor<'_>) -> Result<(), PersistError> {
        let meta = self.with(|s| Ok(s.meta.clone()))?;
        for kv in meta.scan_prefix(prefix) {
            let (k, v) = kv.map_err(io)?;
            f(&String::from_utf8_lossy(&k), &v)?;
        }
        Ok(())
    }

    fn table_defs(&self) -> Result<Vec<(String, Vec<u8>)>, PersistError> {
        self.with(|s| {
            s.tables
                .iter()
                .map(|kv| {
                    let (k, v) = kv.map_err(io)?;
                    Ok((String::from_utf8_lossy(&k).into_owned(), v.to_vec()))
                })
                .collect()
        })
    }

    fn put_table_def(&self, name: &str, def: &[u8]) -> Result<(), PersistError> {
        self.with(|s| {
            s.tables.insert(name, def).map_err(io)?;
            Ok(())
        })
    }

    fn remove_table(&self, name: &str) -> Result<(), PersistError> {
        // Definition first: a crash in between leaves a data space with no
        // definition, which start-up removes, never a table that comes back.
        self.with(|s| {
            s.tables.remove(name).map_err(io)?;
            s.db.drop_tree(format!("{DATA_PREFIX}{name}")).map_err(io)?;
            Ok(())
        })
    }

    fn data_spaces(&self) -> Result<Vec<String>, PersistError> {
        let names = self.with(|s| Ok(s.db.tree_names()))?;
        Ok(names
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
        let bytes = changes
            .iter()
            .map(|(k, r)| k.len() + r.as_ref().map_or(0, Vec::len))
            .sum();
        self.has_room(bytes)?;
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

    fn get(&self, table: &str, key: &[u8]) -> Result<Option<Vec<u8>>, PersistError> {
        Ok(self.data(table)?.get(key).map_err(io)?.map(|v| v.to_vec()))
    }

    fn for_each_prefixed(
        &self,
        table: &str,
        prefix: &[u8],
        f: &mut Visitor<'_>,
    ) -> Result<(), PersistError> {
        for kv in self.data(table)?.scan_prefix(prefix) {
            let (k, v) = kv.map_err(io)?;
            f(&k, &v)?;
        }
        Ok(())
    }

    fn reopen(&self) -> Result<(), PersistError> {
        // sled 0.34 cannot be reopened in place after its log failed to
        // write: closing the database waits for that write forever, and the
        // open database keeps the directory's lock. So the disk is kept
        // from filling under sled instead (`has_room`, checked before every
        // batch), and a database that failed anyway stays refused until
        // the server restarts.
        Ok(())
    }

    fn has_room(&self, bytes: usize) -> Result<(), PersistError> {
        let free =
            free_bytes(&self.dir).map_err(|e| os("cannot measure the disk of", &self.dir, e))?;
        let needed = (bytes as u64)
            .saturating_mul(2)
            .saturating_add(DISK_RESERVE);
        if free < needed {
            return Err(os(
                "not enough room on the disk of",
                &self.dir,
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ));
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), PersistError> {
        self.with(|s| {
            s.db.flush().map_err(io)?;
            Ok(())
        })?;
        self.syncer.sync_after_flush()
    }
}
