//! The durable tier: sled behind [`Engine`], write-back of dirty objects, group
//! commit for `sync` tables, recovery at start, and the versioned format.
//!
//! Nothing outside this module knows about sled. The store marks changed keys
//! dirty (under the key's lock); [`Durability`] writes them out:
//!
//! - `periodic` tables: a table's dirty keys are written and fsynced
//!   `auto_save_ms / 2` after the table first became dirty, so an
//!   acknowledged write reaches disk within `auto_save_ms` as long as a save
//!   takes less than half the interval, whatever the load. A save that runs
//!   longer is logged as a warning.
//! - `sync` tables: a handler applies its change in memory, takes a ticket,
//!   and waits until a write-back round that started after the ticket was
//!   issued has fsynced. Writers that arrive while a round is on disk share
//!   the next round's single fsync (group commit).
//!
//! # Tasks
//! One OS thread (the "persister") runs all rounds, since sled's calls block.
//! Handlers wake it through a mutex-and-condvar flag and wait on a watch
//! channel that carries the highest ticket made durable.

mod codec;
mod engine;
mod migrate;
mod recovery;
mod writeback;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use thiserror::Error;
use tokio::sync::watch;

pub use codec::{decode_slot, encode_body, encode_slot, StoredTable, FORMAT_VERSION, RECORD_V2};
pub use engine::{
    Change, Engine, EngineWrapper, MetaVisitor, SledEngine, Visitor, DEFAULT_SLED_CACHE_BYTES,
    LOCK_FILE,
};
pub use migrate::{migrate, Migration, MIGRATIONS};
pub use recovery::RecoveryReport;
pub use writeback::{FlushOutcome, FlushStats};

use crate::store::{Store, Table};

/// Why the durable tier failed. Causes are kept as sources, so a log line
/// shows the whole chain.
#[derive(Debug, Error)]
pub enum PersistError {
    /// The data directory could not be opened.
    #[error("{0}")]
    Open(String),
    /// The storage engine (sled) failed.
    #[error("storage engine failed: {0}")]
    Engine(#[from] sled::Error),
    /// A file or directory operation failed.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// What was being done.
        what: &'static str,
        /// To which file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A write-back round failed; its cause is logged where it happened.
    #[error("{0}")]
    Round(String),
    /// Stored bytes are not what we wrote.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The data directory was written by a newer larder.
    #[error("its format version is {found}, and this larder understands versions up to {supported}; refusing to touch it")]
    TooNew {
        /// Version found on disk.
        found: u32,
        /// Newest version this build knows.
        supported: u32,
    },
    /// The persister has stopped.
    #[error("the durable tier is stopping")]
    Stopped,
}

/// How far sync-mode tickets have got: every ticket up to `durable` is on
/// disk; every ticket up to `failed` (and past `durable`) saw its round fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    durable: u64,
    failed: u64,
}

tokio::task_local! {
    /// Set while a request's caller takes over its `sync` waits.
    static DEFERRED: std::cell::Cell<bool>;
}

/// Runs `work` with its `sync` waits deferred to the caller, who must call
/// [`Durability::wait_durable`] before answering when the second value is
/// true. An idempotent write uses this to make its change and its record
/// durable in one round; `select_delete` to wait once for all its deletes.
pub async fn deferring<F: std::future::Future>(work: F) -> (F::Output, bool) {
    DEFERRED
        .scope(std::cell::Cell::new(false), async move {
            let out = work.await;
            (out, DEFERRED.with(std::cell::Cell::get))
        })
        .await
}

/// Inside [`deferring`], notes that a `sync` wait is owed and returns true;
/// elsewhere returns false and the caller waits itself.
pub fn defer_wait() -> bool {
    DEFERRED.try_with(|d| d.set(true)).is_ok()
}

/// Handle to the durable tier. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct Durability {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    engine: Arc<dyn Engine>,
    store: Store,
    dir: PathBuf,
    /// Last ticket handed to a waiting writer.
    next_ticket: AtomicU64,
    /// Progress of tickets, for waiters.
    progress: watch::Sender<Progress>,
    /// Set when someone wants a round now; the persister sleeps on it.
    wake: Mutex<WakeFlags>,
    wake_cv: Condvar,
    /// Set once shutdown begins.
    stopping: AtomicBool,
    /// Set when an idempotency record was written or removed since the
    /// last flush.
    records_dirty: AtomicBool,
    /// The store's revision when freed memory was last given back to the
    /// OS (see `writeback::TRIM_AFTER_QUIET`).
    revision_at_trim: AtomicU64,
    /// The store's revision at the last round that found nothing to write.
    revision_at_idle: AtomicU64,
    /// Counters of rounds and writes, for logs and metrics.
    stats: FlushStats,
    /// Where round durations are recorded, once metrics are wired.
    round_histogram: std::sync::OnceLock<Arc<crate::histogram::Histogram>>,
    /// Held for a whole write-back round and for every change of a table's
    /// stored definition, so a round never writes a dropped table's keys
    /// into the data space of a table re-created under the same name.
    round_lock: Mutex<()>,
}

#[derive(Debug, Default)]
struct WakeFlags {
    /// A writer is waiting for a round.
    pending: bool,
    /// Write every table's dirty keys, not only those due.
    force: bool,
}

impl Durability {
    /// Opens the data directory, upgrades its format if needed, and returns
    /// a handle; nothing is loaded yet (see [`Durability::recover`]).
    ///
    /// # Errors
    /// [`PersistError::Open`], [`PersistError::TooNew`], or a failed migration.
    pub fn open(dir: &Path, store: Store) -> Result<Self, PersistError> {
        Self::open_with(dir, store, None, DEFAULT_SLED_CACHE_BYTES)
    }

    /// Like [`Durability::open`], with sled's page cache bounded to
    /// `sled_cache_bytes` and the engine passed through `wrap` first (tests
    /// record what reaches the engine).
    ///
    /// # Errors
    /// As [`Durability::open`].
    pub fn open_with(
        dir: &Path,
        store: Store,
        wrap: Option<EngineWrapper>,
        sled_cache_bytes: u64,
    ) -> Result<Self, PersistError> {
        if dir.exists() && !dir.is_dir() {
            return Err(PersistError::Open("it is not a directory".into()));
        }
        let mut engine: Arc<dyn Engine> =
            Arc::new(SledEngine::open_with_cache(dir, sled_cache_bytes)?);
        if let Some(wrap) = wrap {
            engine = wrap(engine);
        }
        migrate(engine.as_ref())?;
        Ok(Durability {
            inner: Arc::new(Inner {
                engine,
                store,
                dir: dir.to_owned(),
                next_ticket: AtomicU64::new(0),
                progress: watch::channel(Progress::default()).0,
                wake: Mutex::new(WakeFlags::default()),
                wake_cv: Condvar::new(),
                stopping: AtomicBool::new(false),
                records_dirty: AtomicBool::new(false),
                revision_at_trim: AtomicU64::new(0),
                revision_at_idle: AtomicU64::new(0),
                stats: FlushStats::default(),
                round_histogram: std::sync::OnceLock::new(),
                round_lock: Mutex::new(()),
            }),
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Records each write-back round's duration, in seconds, here.
    pub fn set_round_histogram(&self, histogram: Arc<crate::histogram::Histogram>) {
        let _ = self.inner.round_histogram.set(histogram);
    }

    /// Round and write counters.
    pub fn stats(&self) -> &FlushStats {
        &self.inner.stats
    }

    /// Stores a new persistent table's definition durably, after removing
    /// any data a crashed drop left under its name; nothing for a memory-only
    /// table. Call under the store's catalog, before the table is visible.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    pub fn create_table(&self, table: &Table) -> Result<(), PersistError> {
        if !table.persistence().is_local_durable() {
            return Ok(());
        }
        let _round = self.round_guard();
        // A data space left by a drop that crashed half-way must not leak
        // into the new table.
        self.inner.engine.remove_table(table.name())?;
        self.write_definition(table)
    }

    /// Rewrites a persistent table's definition (after PATCH or give-away)
    /// and lets the persister replan its sleep; nothing for a memory-only
    /// table.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    pub fn save_definition(&self, table: &Table) -> Result<(), PersistError> {
        if !table.persistence().is_local_durable() {
            return Ok(());
        }
        {
            let _round = self.round_guard();
            self.write_definition(table)?;
        }
        // A shorter auto_save_ms must not wait out the persister's sleep.
        self.table_added();
        Ok(())
    }

    fn write_definition(&self, table: &Table) -> Result<(), PersistError> {
        let def = StoredTable::of(&table.spec()).encode();
        self.inner.engine.put_table_def(table.name(), &def)?;
        self.inner.engine.flush()
    }

    /// Makes the persister recompute when the next save is due, without
    /// forcing a round. The persister plans its sleep from the tables it
    /// knows: call this once a new persistent table is visible, or after a
    /// table's `auto_save_ms` got shorter, so neither waits out that sleep.
    pub fn table_added(&self) {
        let _flags = self
            .inner
            .wake
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.inner.wake_cv.notify_one();
    }

    /// Removes a persistent table's definition and data from disk (nothing
    /// for a memory-only table). Call under the store's catalog, once the table has left the store: a round that
    /// still holds the table finishes first (the round lock), and no later
    /// round can see it.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    pub fn drop_table(&self, table: &Table) -> Result<(), PersistError> {
        if !table.persistence().is_local_durable() {
            return Ok(());
        }
        let _round = self.round_guard();
        self.inner.engine.remove_table(table.name())?;
        self.inner
            .engine
            .remove_meta(&writeback::cleared_key(table.name()))?;
        self.inner.engine.flush()
    }

    /// Stores an idempotency record (durable after the next round, see
    /// [`Durability::wait_durable`]).
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    pub fn put_record(&self, key: &str, value: &[u8]) -> Result<(), PersistError> {
        self.inner.engine.put_meta(key, value)?;
        self.inner.records_dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes an idempotency record.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    pub fn remove_record(&self, key: &str) -> Result<(), PersistError> {
        self.inner.engine.remove_meta(key)?;
        self.inner.records_dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// The idempotency record stored under `key`, if any.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    pub fn record(&self, key: &str) -> Result<Option<Vec<u8>>, PersistError> {
        self.inner.engine.get_meta(key)
    }

    /// Calls `f` with every idempotency record stored under keys starting
    /// with `prefix`, one at a time.
    ///
    /// # Errors
    /// [`PersistError::Engine`], or what `f` returns.
    pub fn for_each_record(
        &self,
        prefix: &str,
        f: &mut MetaVisitor<'_>,
    ) -> Result<(), PersistError> {
        self.inner.engine.for_each_meta(prefix, f)
    }

    /// Waits for any write-back round in flight, and keeps the next one
    /// from starting until the guard is dropped.
    fn round_guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.inner
            .round_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until every change applied in memory before this call is on
    /// disk. Used by `sync` writes and `POST …/sync`.
    ///
    /// # Errors
    /// [`PersistError::Engine`] when the round failed (the change stays in memory
    /// and is retried), [`PersistError::Stopped`].
    pub async fn wait_durable(&self, force: bool) -> Result<(), PersistError> {
        // The change is already in memory and marked dirty; a round that
        // reads this ticket counter afterwards will include it.
        let ticket = self.inner.next_ticket.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake(force);
        let mut rx = self.inner.progress.subscribe();
        let seen = rx
            .wait_for(|p| p.durable >= ticket || p.failed >= ticket)
            .await
            .map_err(|_| PersistError::Stopped)?;
        if seen.durable >= ticket {
            Ok(())
        } else {
            Err(PersistError::Round(
                "the write-back round failed; the change is kept in memory and retried".into(),
            ))
        }
    }

    fn wake(&self, force: bool) {
        let mut flags = self
            .inner
            .wake
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        flags.pending = true;
        flags.force |= force;
        self.inner.wake_cv.notify_one();
    }
}
