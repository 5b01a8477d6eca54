//! The durable tier: sled behind [`Engine`], write-back of dirty objects, group
//! commit for `sync` tables, recovery at start, and the versioned format.
//!
//! Over 600 lines: `Durability` is the tier's one handle, and its methods
//! (tickets, gates, records, recovery) guard one set of invariants
//! described here; the round itself lives in `writeback`.
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

pub mod bundle;
mod codec;
mod engine;
pub mod filter;
mod layout;
mod migrate;
mod recovery;
mod writeback;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use thiserror::Error;
use tokio::sync::watch;

pub use codec::{
    decode_slot, encode_body, encode_slot, StoredTable, FORMAT_VERSION, RECORD_V2, RECORD_V3,
};
pub use engine::{
    Change, Engine, EngineWrapper, MetaVisitor, SledEngine, Visitor, DEFAULT_SLED_CACHE_BYTES,
    LOCK_FILE,
};
pub use filter::{Rebuild, RecordFilter, DEFAULT_FILTER_BYTES};
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
    /// Start-up's loading thread could not start or stopped abnormally.
    #[error("loading the stored tables failed: {0}")]
    Load(String),
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
    /// A write-back round failed to reach disk: the changes it held on
    /// `sync` tables were undone, and writes to durable tables are refused
    /// until the disk takes writes again.
    #[error("the disk did not take the write{}; it was undone", if *.full { " (the disk is full)" } else { "" })]
    Failed {
        /// The disk was full.
        full: bool,
    },
}

impl PersistError {
    /// Whether the error is a full disk (`ENOSPC`).
    pub fn is_disk_full(&self) -> bool {
        let io = match self {
            PersistError::Engine(sled::Error::Io(e)) => e,
            PersistError::File { source, .. } => source,
            PersistError::Failed { full } => return *full,
            _ => return false,
        };
        io.kind() == std::io::ErrorKind::StorageFull || io.raw_os_error() == Some(28)
    }
}

/// The disk takes writes.
const HEALTHY: u8 = 0;
/// The last round failed; writes to durable tables are refused.
const FAILED: u8 = 1;
/// The last round failed on a full disk.
const FULL: u8 = 2;

/// The metadata key of the revision lease: no revision above it has been
/// handed out (see the store's `lease` module).
pub(crate) const LEASE_KEY: &str = "revision_lease";

/// How far sync-mode tickets have got: every ticket up to `durable` is on
/// disk; every ticket up to `failed` (and past `durable`) saw its round fail.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Progress {
    durable: u64,
    failed: u64,
    /// The last failure was a full disk.
    full: bool,
}

tokio::task_local! {
    /// Set while a request's caller takes over its `sync` waits: the last
    /// ticket owed.
    static DEFERRED: std::cell::Cell<Option<u64>>;
}

/// Runs `work` with its `sync` waits deferred to the caller, who must wait
/// for the ticket returned (with [`Durability::wait_ticket`]) before
/// answering. An idempotent write uses this to make its change and its
/// record durable in one round; `select_delete` to wait once for all its
/// deletes.
pub async fn deferring<F: std::future::Future>(work: F) -> (F::Output, Option<u64>) {
    DEFERRED
        .scope(std::cell::Cell::new(None), async move {
            let out = work.await;
            (out, DEFERRED.with(std::cell::Cell::get))
        })
        .await
}

tokio::task_local! {
    /// Set while a keyed write to a durable local table runs, which holds
    /// the record gate: the key its record goes with when the request's
    /// path names none (a transaction's first changed key).
    static KEYED: std::cell::RefCell<Option<String>>;
}

/// Runs a keyed write that holds the record gate; returns its output and
/// the key noted with [`note_anchor`], if any.
pub async fn keyed<F: std::future::Future>(work: F) -> (F::Output, Option<String>) {
    KEYED
        .scope(std::cell::RefCell::new(None), async move {
            let out = work.await;
            (out, KEYED.with(|k| k.borrow_mut().take()))
        })
        .await
}

/// Whether the running task is a keyed write that holds the record gate
/// (taking it again could wait behind a round that waits for it).
pub fn holds_record_gate() -> bool {
    KEYED.try_with(|_| ()).is_ok()
}

/// Inside [`keyed`], notes the key the write's record goes with (the
/// first one noted wins).
pub fn note_anchor(key: &str) {
    let _ = KEYED.try_with(|k| {
        k.borrow_mut().get_or_insert_with(|| key.to_owned());
    });
}

/// Inside [`deferring`], notes that `ticket` is owed and returns true;
/// elsewhere returns false and the caller waits itself.
pub fn defer_ticket(ticket: u64) -> bool {
    DEFERRED
        .try_with(|d| d.set(Some(d.get().map_or(ticket, |t| t.max(ticket)))))
        .is_ok()
}

/// A write to a `sync` table being applied: while it lives, no failed
/// round can undo changes and fail tickets, so the write's change and its
/// ticket fall on the same side of any failure.
#[derive(Debug)]
pub struct SyncWrite<'a> {
    durability: &'a Durability,
    _gate: std::sync::RwLockReadGuard<'a, ()>,
}

impl SyncWrite<'_> {
    /// The ticket of the change just applied: wait for it (or defer it)
    /// before answering.
    pub fn ticket(self) -> u64 {
        self.durability.take_ticket(false)
    }
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
    /// Where fsync durations are recorded, once metrics are wired.
    fsync_histogram: std::sync::OnceLock<Arc<crate::histogram::Histogram>>,
    /// Held for a whole write-back round and for every change of a table's
    /// stored definition, so a round never writes a dropped table's keys
    /// into the data space of a table re-created under the same name.
    round_lock: Mutex<()>,
    /// Held while a new revision lease is stored.
    lease_move: Mutex<()>,
    /// Held (shared) by a `sync` write from before its change until it has
    /// its ticket, and (exclusively) by a failed round while it undoes
    /// changes and fails tickets.
    sync_gate: std::sync::RwLock<()>,
    /// 0 while the disk takes writes; [`FAILED`] or [`FULL`] after a round
    /// failed, until a probe write succeeds again.
    health: std::sync::atomic::AtomicU8,
    /// Held (shared) by a keyed write from before its change until its
    /// idempotency record is attached, and (exclusively) by a round while
    /// it snapshots what to write: a round sees a keyed change together
    /// with its record, or neither.
    record_gate: tokio::sync::RwLock<()>,
    /// Idempotency records waiting for the round that writes their table,
    /// by table name.
    pending_records: Mutex<std::collections::HashMap<String, Vec<PendingRecord>>>,
    /// Which idempotency records may be stored with tables' data.
    record_filter: RecordFilter,
    /// Which bundle holds each indexed idempotency record.
    locator: bundle::Locator,
    /// The number the next bundle of records is stored under (one past
    /// the highest found at start).
    next_bundle: AtomicU64,
}

/// An idempotency record on its way to disk with the change it answers.
#[derive(Debug, Clone)]
pub(crate) struct PendingRecord {
    /// The key the change wrote: the record goes into the same atomic
    /// batch as it. `None` (or a key not written in the round) puts it in
    /// a batch after the table's others.
    pub anchor: Option<Vec<u8>>,
    /// Its key in the table's data ([`record_key`]) when stored on its
    /// own.
    pub key: Vec<u8>,
    pub bytes: Vec<u8>,
    /// When the answer is forgotten (Unix ms).
    pub expires_at: u64,
    /// The bundle the round stored it in, once the engine holds it (`None`
    /// when stored on its own under `key`).
    pub bundle: Option<u64>,
}

impl PendingRecord {
    fn footprint(&self) -> i64 {
        (self.key.len() + self.bytes.len() + self.anchor.as_ref().map_or(0, Vec::len) + 64) as i64
    }
}

/// A visitor of stored idempotency records, `(table, key, record)`; its
/// error stops the walk.
pub type RecordVisitor<'a> = dyn FnMut(&str, &[u8], &[u8]) -> Result<(), PersistError> + 'a;

/// Where a table's idempotency record `id` is kept in its data: after a
/// NUL byte, which no entry key has, so recovery and scans tell them apart.
pub fn record_key(id: &str) -> Vec<u8> {
    [RECORD_KEY_PREFIX, id.as_bytes()].concat()
}

/// What every idempotency record's key in a table's data starts with.
pub const RECORD_KEY_PREFIX: &[u8] = b"\0i/";

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
        let durability = Durability {
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
                fsync_histogram: std::sync::OnceLock::new(),
                round_lock: Mutex::new(()),
                lease_move: Mutex::new(()),
                sync_gate: std::sync::RwLock::new(()),
                health: std::sync::atomic::AtomicU8::new(HEALTHY),
                record_gate: tokio::sync::RwLock::new(()),
                pending_records: Mutex::new(std::collections::HashMap::new()),
                record_filter: RecordFilter::new(DEFAULT_FILTER_BYTES),
                locator: bundle::Locator::default(),
                next_bundle: AtomicU64::new(1),
            }),
        };
        // The store asks for a new lease through the persister (a weak
        // handle: the store must not keep the durable tier alive).
        let weak = Arc::downgrade(&durability.inner);
        durability
            .inner
            .store
            .on_revision_lease_low(Box::new(move |now| {
                if let Some(inner) = weak.upgrade() {
                    let durability = Durability { inner };
                    if !now {
                        durability.wake(false);
                    } else if let Err(e) = durability.move_lease() {
                        tracing::error!(error = %e, "could not store a new revision lease");
                    }
                }
            }));
        Ok(durability)
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Records each write-back round's duration, in seconds, here.
    pub fn set_round_histogram(&self, histogram: Arc<crate::histogram::Histogram>) {
        let _ = self.inner.round_histogram.set(histogram);
    }

    /// Records each write-back fsync's duration, in seconds, here.
    pub fn set_fsync_histogram(&self, histogram: Arc<crate::histogram::Histogram>) {
        let _ = self.inner.fsync_histogram.set(histogram);
    }

    /// The filter that spares a keyed write the disk lookup of a record
    /// that cannot exist.
    pub fn record_filter(&self) -> &RecordFilter {
        &self.inner.record_filter
    }

    /// Starts rebuilding the record filter, with every queued record in
    /// the new one already (the purge adds the stored ones it keeps).
    pub fn rebuild_record_filter(&self) -> Option<Rebuild<'_>> {
        let rebuild = self.inner.record_filter.rebuild()?;
        let pending = self
            .inner
            .pending_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for record in pending.values().flatten() {
            if let Some(id) = record.key.strip_prefix(RECORD_KEY_PREFIX) {
                rebuild.keep(id);
            }
        }
        drop(pending);
        Some(rebuild)
    }

    /// Round and write counters.
    pub fn stats(&self) -> &FlushStats {
        &self.inner.stats
    }

    /// Stores a revision lease one block past the store's revision, then
    /// lets the store hand out revisions up to it. Run at recovery, before
    /// any write, and by the persister whenever the store asks.
    ///
    /// # Errors
    /// [`PersistError::Engine`]: the old lease stays, and writers past it
    /// wait.
    pub fn move_lease(&self) -> Result<(), PersistError> {
        let inner = &self.inner;
        // One move at a time: a writer past the lease and the persister
        // may both ask.
        let _moving = inner
            .lease_move
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !inner.store.revision_lease_wanted() && inner.store.revision_lease() != u64::MAX {
            return Ok(());
        }
        let current = inner.store.revision_lease();
        let lease = inner
            .store
            .revision()
            .saturating_add(crate::store::LEASE_BLOCK)
            .max(if current == u64::MAX { 0 } else { current });
        inner.engine.put_meta(LEASE_KEY, &lease.to_be_bytes())?;
        inner.engine.flush()?;
        inner.store.set_revision_lease(lease);
        Ok(())
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
        self.discard_records(table.name());
        let unindexed = self.inner.locator.drop_table(table.name());
        self.count_index(-(unindexed as i64));
        self.inner.engine.remove_table(table.name())?;
        self.inner
            .engine
            .remove_meta(&writeback::cleared_key(table.name()))?;
        self.inner.engine.flush()
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

    /// Whether writes to durable tables may be applied now: after a round
    /// failed to reach disk they are refused until a probe write succeeds.
    ///
    /// # Errors
    /// [`PersistError::Failed`].
    pub fn accepting(&self) -> Result<(), PersistError> {
        match self.inner.health.load(Ordering::Acquire) {
            HEALTHY => Ok(()),
            state => Err(PersistError::Failed {
                full: state == FULL,
            }),
        }
    }

    /// Holds off the next round's snapshot until the guard is dropped: a
    /// keyed write takes it before it applies its change and drops it once
    /// its record is attached ([`Durability::attach_record`]), so no round
    /// makes the change durable without the record.
    pub async fn record_gate(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.inner.record_gate.read().await
    }

    /// Queues the idempotency record `id` of a write to `table` for the
    /// round that writes the table's changes: in the same atomic batch as
    /// the key `anchor` (the key the write changed), so a crash keeps both
    /// or neither. Counted in the server's memory until written.
    /// A change waiting for `ticket` whose round already failed was undone:
    /// its record is dropped (false), under the gate that failed rounds
    /// take, so a record is never written for an undone change.
    pub fn attach_record(
        &self,
        table: &str,
        anchor: Option<&str>,
        id: &str,
        (bytes, expires_at): (Vec<u8>, u64),
        ticket: Option<u64>,
    ) -> bool {
        let _gate = self
            .inner
            .sync_gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(ticket) = ticket {
            let p = *self.inner.progress.borrow();
            if p.durable < ticket && p.failed >= ticket {
                return false;
            }
        }
        // A keyed drop: the table's data, where the record would go, is
        // gone, and no round would ever take it.
        if self.inner.store.table(table).is_err() {
            return false;
        }
        self.inner.record_filter.insert(id.as_bytes());
        let record = PendingRecord {
            anchor: anchor.map(|a| a.as_bytes().to_vec()),
            key: record_key(id),
            bytes,
            expires_at,
            bundle: None,
        };
        self.inner
            .store
            .memory()
            .add(crate::store::MemoryKind::Idempotency, record.footprint());
        self.inner
            .pending_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(table.to_owned())
            .or_default()
            .push(record);
        true
    }

    /// Copies of the idempotency records waiting for `table`'s next
    /// round. They stay queued, and so found by a retry, until the engine
    /// holds them ([`Durability::records_written`]).
    pub(crate) fn copy_records(&self, table: &str) -> Vec<PendingRecord> {
        self.inner
            .pending_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(table)
            .cloned()
            .unwrap_or_default()
    }

    /// Unqueues the first `n` of `table`'s records: the engine holds them.
    pub(crate) fn records_written(&self, table: &str, n: usize) {
        if n == 0 {
            return;
        }
        let mut pending = self
            .inner
            .pending_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let Some(queue) = pending.get_mut(table) else {
            return;
        };
        let bytes: i64 = queue
            .drain(..n.min(queue.len()))
            .map(|r| r.footprint())
            .sum();
        if queue.is_empty() {
            pending.remove(table);
        }
        drop(pending);
        self.inner
            .store
            .memory()
            .add(crate::store::MemoryKind::Idempotency, -bytes);
    }

    /// Drops every record queued for `table` (their changes were undone).
    pub(crate) fn discard_records(&self, table: &str) {
        let dropped = self
            .inner
            .pending_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(table)
            .unwrap_or_default();
        let bytes: i64 = dropped.iter().map(PendingRecord::footprint).sum();
        self.inner
            .store
            .memory()
            .add(crate::store::MemoryKind::Idempotency, -bytes);
    }

    /// Puts records of a failed round back, for the next one.
    pub(crate) fn return_records(&self, table: &str, records: Vec<PendingRecord>) {
        if records.is_empty() {
            return;
        }
        let bytes: i64 = records.iter().map(PendingRecord::footprint).sum();
        self.inner
            .store
            .memory()
            .add(crate::store::MemoryKind::Idempotency, bytes);
        let mut pending = self
            .inner
            .pending_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let queue = pending.entry(table.to_owned()).or_default();
        let later = std::mem::replace(queue, records);
        queue.extend(later);
    }

    /// The idempotency record `id` of a write to `table`: queued for the
    /// next round, or stored with the table's data.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    pub fn table_record(&self, table: &str, id: &str) -> Result<Option<Vec<u8>>, PersistError> {
        let key = record_key(id);
        let queued = self
            .inner
            .pending_records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(table)
            .and_then(|q| {
                q.iter()
                    .rev()
                    .find(|r| r.key == key)
                    .map(|r| r.bytes.clone())
            });
        if queued.is_some() {
            return Ok(queued);
        }
        let filter = &self.inner.record_filter;
        if !filter.may_hold(id.as_bytes()) {
            return Ok(None);
        }
        if let Some(n) = self.inner.locator.get(table, id.as_bytes()) {
            if let Some(bytes) = self.inner.engine.get(table, &bundle::bundle_key(n))? {
                if let Some(found) = bundle::decode(&bytes)?.find(id.as_bytes()) {
                    return Ok(Some(found.to_vec()));
                }
            }
        }
        let stored = self.inner.engine.get(table, &key)?;
        if stored.is_none() {
            filter.false_positive();
        }
        Ok(stored)
    }

    /// Calls `f` with `(table, key, record)` for every idempotency record
    /// stored with a durable table's data.
    ///
    /// # Errors
    /// [`PersistError::Engine`], or what `f` returns.
    pub fn for_each_table_record(&self, f: &mut RecordVisitor<'_>) -> Result<(), PersistError> {
        for table in self.inner.store.persistent_tables() {
            let name = table.name();
            self.inner
                .engine
                .for_each_prefixed(name, RECORD_KEY_PREFIX, &mut |k, v| f(name, k, v))?;
        }
        Ok(())
    }

    /// Removes every bundle of idempotency records whose last record has
    /// expired by `now`, and keeps the records of the others in `rebuild`.
    /// A bundle that cannot be read is left, and the walk goes on.
    ///
    /// # Errors
    /// [`PersistError::Engine`] when a table's bundles cannot be walked or
    /// removed.
    pub fn purge_bundles(
        &self,
        now: u64,
        rebuild: Option<&Rebuild<'_>>,
    ) -> Result<(), PersistError> {
        let inner = &self.inner;
        for table in inner.store.persistent_tables() {
            let name = table.name();
            // Expired bundles, with the ids they index.
            let mut gone: Vec<(u64, Vec<Vec<u8>>)> = Vec::new();
            inner
                .engine
                .for_each_prefixed(name, bundle::BUNDLE_KEY_PREFIX, &mut |k, v| {
                    let (Some(n), Ok(b)) = (bundle::bundle_number(k), bundle::decode(v)) else {
                        tracing::warn!(
                            table = name,
                            "an idempotency bundle cannot be read; left in place"
                        );
                        return Ok(());
                    };
                    if b.expires_at < now {
                        gone.push((n, b.records.iter().map(|(id, _)| id.to_vec()).collect()));
                    } else if let Some(rebuild) = rebuild {
                        for (id, _) in &b.records {
                            rebuild.keep(id);
                        }
                    }
                    Ok(())
                })?;
            if gone.is_empty() {
                continue;
            }
            let erase = gone
                .iter()
                .map(|(n, _)| (bundle::bundle_key(*n), None))
                .collect();
            inner.engine.write(name, erase)?;
            inner.records_dirty.store(true, Ordering::Release);
            for (n, ids) in &gone {
                let unindexed = inner
                    .locator
                    .remove_all(name, ids.iter().map(Vec::as_slice), *n);
                self.count_index(-(unindexed as i64));
            }
        }
        Ok(())
    }

    /// The index of bundled records: entries held, and its bound.
    pub fn record_index(&self) -> &bundle::Locator {
        &self.inner.locator
    }

    /// Counts `entries` more (or fewer) index entries in the server's
    /// memory.
    pub(crate) fn count_index(&self, entries: i64) {
        if entries != 0 {
            self.inner.store.memory().add(
                crate::store::MemoryKind::Idempotency,
                entries * bundle::INDEX_ENTRY_BYTES as i64,
            );
        }
    }

    /// Removes a stored idempotency record of a table's.
    ///
    /// # Errors
    /// [`PersistError::Engine`].
    pub fn remove_table_record(&self, table: &str, key: &[u8]) -> Result<(), PersistError> {
        self.inner.engine.write(table, vec![(key.to_vec(), None)])
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
        let ticket = self.take_ticket(force);
        self.wait_ticket(ticket).await
    }

    /// Starts a write to a `sync` table: refused while the disk does not
    /// take writes; otherwise apply the change, then take its ticket from
    /// the guard.
    ///
    /// # Errors
    /// [`PersistError::Failed`].
    pub fn sync_write(&self) -> Result<SyncWrite<'_>, PersistError> {
        let gate = self
            .inner
            .sync_gate
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        self.accepting()?;
        Ok(SyncWrite {
            durability: self,
            _gate: gate,
        })
    }

    /// A ticket for everything applied (and every record attached) so
    /// far, and a round woken for it: wait for it with
    /// [`Durability::wait_ticket`].
    pub fn ticket(&self) -> u64 {
        self.take_ticket(false)
    }

    /// Wakes the persister for a round of the tables that are due.
    pub fn request_round(&self) {
        self.wake(false);
    }

    /// A ticket for everything applied so far, and a round woken for it.
    fn take_ticket(&self, force: bool) -> u64 {
        let ticket = self.inner.next_ticket.fetch_add(1, Ordering::AcqRel) + 1;
        self.wake(force);
        ticket
    }

    /// Waits until a round has made `ticket` durable.
    ///
    /// # Errors
    /// [`PersistError::Failed`] when its round failed (its change was
    /// undone), [`PersistError::Stopped`].
    pub async fn wait_ticket(&self, ticket: u64) -> Result<(), PersistError> {
        let mut rx = self.inner.progress.subscribe();
        let seen = rx
            .wait_for(|p| p.durable >= ticket || p.failed >= ticket)
            .await
            .map_err(|_| PersistError::Stopped)?;
        if seen.durable >= ticket {
            Ok(())
        } else {
            Err(PersistError::Failed { full: seen.full })
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
