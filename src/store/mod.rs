//! The in-memory store: named tables of the four ETS types.
//!
//! Nothing here knows about HTTP or about disk. The API layer calls these
//! methods; the durable tier observes their effects.
//!
//! # Sharing
//! [`Store`] is a cheap handle (cloning is shallow). Tables are
//! `Arc<Table>`: a request holds its table for its own duration, so dropping a
//! table never pulls memory from under a request in flight.
//!
//! # The catalog
//! Creating, dropping and re-defining tables go one at a time, under the
//! catalog lock, each with a hook in which the caller makes the change
//! durable. A new table becomes visible only after its hook succeeded, so no
//! write to it can be acknowledged before its definition is on disk; a drop
//! finishes its hook before a table of the same name can be created; and the
//! table limit is checked and taken in one step. Lookups never take the
//! lock. The hooks block (they fsync): call these from blocking threads.

mod canonical;
mod counter;
mod error;
mod evict;
mod expiry;
mod lease;
mod memory;
pub mod raw;
pub mod rules;
mod scan;
mod slot;
mod slots;
mod table;
mod txn;
mod types;
mod value;
mod watch;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use dashmap::DashMap;

pub(crate) use canonical::{push_json_str, string_end, whole_number};
pub use counter::{merge_patch, CounterOp};
pub use error::{StoreError, StoreResult};
pub(crate) use evict::sample_one;
pub use evict::EVICTION_SAMPLES;
pub use expiry::{ExpiryWake, IDLE_SWEEP, SWEEP_BUDGET};
pub use lease::LEASE_BLOCK;
pub use memory::{Held, MemoryKind, MemoryUse};
pub use scan::{Cursor, ScanPage, ScanRequest, DEFAULT_SCAN_LIMIT, MAX_SCAN_LIMIT};
pub use slot::{unix_seconds, Entry, Object, Objects, ObjectsMut, ObjectsRef, Slot, Stamp};
pub use table::DEFAULT_MAX_STALE;
pub use table::{Counter, Dirty, Precondition, Stats, Table, TableSpec, Written, MAX_GROUPED_KEYS};
pub use txn::{
    Comparison, Test, Txn, TxnOp, TxnOutcome, TxnResult, MAX_TXN_COMPARISONS, MAX_TXN_OPS,
};
pub use types::{
    Access, CacheScope, Eviction, Expiry, Origin, Persistence, TableSettings, TableType, ValueKind,
};
pub use value::{validate_key, validate_table_name, Key, Value, MAX_KEY_BYTES, MAX_NAME_CHARS};
pub use watch::{Change, ChangeKind, HistoryLimits, Hub, Read, Start, Watcher};

use crate::clock::Clock;

/// Longest TTL a client may ask for: ten years, in milliseconds. Longer ones
/// are almost certainly unit mistakes, and the cap keeps deadlines far from
/// overflow.
pub const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3600 * 1000;
/// Longest `auto_save_ms`: one day.
pub const MAX_AUTO_SAVE_MS: u64 = 24 * 3600 * 1000;
/// `auto_save_ms` of a `periodic` table created without one, as DETS-like
/// service would pick for a cache: one second of exposure.
pub const DEFAULT_AUTO_SAVE_MS: u64 = 1000;

/// State every table of a store shares.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Source of "now" for TTLs and timestamps.
    pub clock: Arc<dyn Clock>,
    /// Last version handed out; versions are unique across the store, so an
    /// ETag never matches an entry of a dropped and re-created table.
    pub revision: AtomicU64,
    /// How far `revision` may go before the durable tier stores more.
    pub lease: lease::Lease,
    /// Bytes held for clients, tables' among them, and the server-wide
    /// limit on their sum.
    pub memory: Arc<MemoryUse>,
    /// Wakes the sweeper when a write sets an earlier deadline.
    pub expiry: ExpiryWake,
    /// How much history each watched table keeps.
    pub watch_limits: Mutex<HistoryLimits>,
    /// Most stale copies one table keeps (`--max-stale-entries`).
    pub max_stale: std::sync::atomic::AtomicUsize,
    /// Transaction keys a table groups before its write-back is due at
    /// once (`--max-grouped-keys`).
    pub max_grouped: std::sync::atomic::AtomicUsize,
    /// Every hub made, so that stopping the server can end every watch.
    pub hubs: Mutex<Vec<std::sync::Weak<Hub>>>,
    /// Hands what cleared tables held to the reclaimer thread, which frees
    /// it; made on the first clear.
    reclaimer: Mutex<Option<std::sync::mpsc::Sender<ReclaimJob>>>,
}

/// Freeing what a clear took out of a table.
pub(crate) type ReclaimJob = Box<dyn FnOnce() + Send>;

impl Shared {
    /// The hubs of the tables that still have one, those of dropped tables
    /// left out as the list is looked at.
    pub(crate) fn hubs(&self) -> MutexGuard<'_, Vec<std::sync::Weak<Hub>>> {
        let mut hubs = self.hubs.lock().unwrap_or_else(PoisonError::into_inner);
        hubs.retain(|h| h.strong_count() > 0);
        hubs
    }

    /// Frees `job`'s memory on the reclaimer thread, started on first use
    /// (it ends when the store is dropped); frees it here if no thread can
    /// be started.
    pub(crate) fn reclaim(&self, job: ReclaimJob) {
        let mut sender = self
            .reclaimer
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let job = match sender.as_ref() {
            Some(tx) => match tx.send(job) {
                Ok(()) => return,
                Err(std::sync::mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = std::sync::mpsc::channel::<ReclaimJob>();
        let started = std::thread::Builder::new()
            .name("larder-reclaim".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job();
                }
            });
        match started {
            Ok(_) => match tx.send(job) {
                Ok(()) => *sender = Some(tx),
                Err(std::sync::mpsc::SendError(job)) => job(),
            },
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the reclaimer thread; freeing in line");
                job();
            }
        }
    }
}

/// Handle to all tables. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct Store {
    tables: Arc<DashMap<Box<str>, Arc<Table>>>,
    /// Held while the set of tables or a table's definition changes; see
    /// "The catalog" above.
    catalog: Arc<Mutex<()>>,
    shared: Arc<Shared>,
}

impl Store {
    /// An empty store reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Store {
            tables: Arc::new(DashMap::new()),
            catalog: Arc::new(Mutex::new(())),
            shared: Arc::new(Shared {
                clock,
                revision: AtomicU64::new(0),
                lease: lease::Lease::unlimited(),
                memory: Arc::default(),
                expiry: ExpiryWake::default(),
                watch_limits: Mutex::new(HistoryLimits::default()),
                max_stale: std::sync::atomic::AtomicUsize::new(DEFAULT_MAX_STALE),
                max_grouped: std::sync::atomic::AtomicUsize::new(MAX_GROUPED_KEYS),
                hubs: Mutex::new(Vec::new()),
                reclaimer: Mutex::new(None),
            }),
        }
    }

    /// The store's clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.shared.clock
    }

    /// Milliseconds since the epoch by the store's clock.
    pub fn now_ms(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// Creates a table (`ets:new`) with no limit and nothing to make
    /// durable: for memory-only use and for recovery.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] for bad settings,
    /// [`StoreError::TableExists`] when the name is taken.
    pub fn create_table(&self, spec: TableSpec) -> StoreResult<Arc<Table>> {
        self.create_table_with(spec, usize::MAX, |_| Ok::<(), StoreError>(()))
    }

    /// Creates a table if fewer than `limit` exist, running `make_durable`
    /// before anyone can see it; the table appears only if that succeeds.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`], [`StoreError::TableExists`],
    /// [`StoreError::TableLimit`], or what `make_durable` returns.
    pub fn create_table_with<E: From<StoreError>>(
        &self,
        spec: TableSpec,
        limit: usize,
        make_durable: impl FnOnce(&Arc<Table>) -> Result<(), E>,
    ) -> Result<Arc<Table>, E> {
        let spec = spec.validated()?;
        self.adopt_table_with(
            Arc::new(Table::new(spec, self.shared.clone())),
            limit,
            make_durable,
        )
    }

    /// Takes `table`, made by [`Store::detached_table`] (an import fills
    /// one before anyone can see it), into the catalog if fewer than
    /// `limit` tables exist and its name is free, running `make_durable`
    /// before anyone can see it; it appears only if that succeeds.
    ///
    /// # Errors
    /// [`StoreError::TableExists`], [`StoreError::TableLimit`], or what
    /// `make_durable` returns.
    pub fn adopt_table_with<E: From<StoreError>>(
        &self,
        table: Arc<Table>,
        limit: usize,
        make_durable: impl FnOnce(&Arc<Table>) -> Result<(), E>,
    ) -> Result<Arc<Table>, E> {
        let _catalog = self.catalog();
        if self.tables.contains_key(table.name()) {
            return Err(StoreError::TableExists(table.name().to_owned()).into());
        }
        if self.tables.len() >= limit {
            return Err(StoreError::TableLimit(limit).into());
        }
        crate::failpoint!("create-after-limit-check");
        crate::failpoint!("create-before-durable");
        make_durable(&table)?;
        self.tables.insert(table.name().into(), table.clone());
        Ok(table)
    }

    /// Removes `table` (`ets:delete/1`), then runs `remove_durably`; if that
    /// fails the table is put back as it was.
    ///
    /// # Errors
    /// [`StoreError::TableNotFound`] when `table` is no longer the table of
    /// its name (dropped meanwhile), or what `remove_durably` returns.
    pub fn drop_table_with<E: From<StoreError>>(
        &self,
        table: &Arc<Table>,
        remove_durably: impl FnOnce(&Arc<Table>) -> Result<(), E>,
    ) -> Result<(), E> {
        let _catalog = self.catalog();
        let name = table.name();
        if self
            .tables
            .remove_if(name, |_, t| Arc::ptr_eq(t, table))
            .is_none()
        {
            return Err(StoreError::TableNotFound(name.to_owned()).into());
        }
        // Give the table's bytes back to the server-wide count; requests
        // still holding the table may touch it, but it is no longer reachable.
        self.shared
            .memory
            .add(MemoryKind::Tables, -table.tracked_bytes());
        crate::failpoint!("drop-before-disk");
        if let Err(e) = remove_durably(table) {
            self.shared
                .memory
                .add(MemoryKind::Tables, table.tracked_bytes());
            self.tables.insert(name.into(), table.clone());
            return Err(e);
        }
        table.close_watch();
        Ok(())
    }

    /// Changes `table`'s settings with `apply`, then runs `save` (which
    /// stores the new definition), as one catalog step.
    ///
    /// # Errors
    /// [`StoreError::TableNotFound`] when `table` was dropped meanwhile, or
    /// what `save` returns.
    pub fn redefine_table<E: From<StoreError>>(
        &self,
        table: &Arc<Table>,
        apply: impl FnOnce(&Table),
        save: impl FnOnce(&Arc<Table>) -> Result<(), E>,
    ) -> Result<(), E> {
        let _catalog = self.catalog();
        let current = self
            .tables
            .get(table.name())
            .is_some_and(|t| Arc::ptr_eq(&t, table));
        if !current {
            return Err(StoreError::TableNotFound(table.name().to_owned()).into());
        }
        apply(table);
        save(table)
    }

    fn catalog(&self) -> MutexGuard<'_, ()> {
        crate::failpoint!("catalog-wait");
        self.catalog.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A table that shares this store's clock but is not one of its
    /// tables: no lookup finds it and no tier persists it. Cluster tables
    /// keep their settings in one.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] for bad settings.
    pub fn detached_table(&self, spec: TableSpec) -> StoreResult<Arc<Table>> {
        Ok(Arc::new(Table::new(spec.validated()?, self.shared.clone())))
    }

    /// The table named `name`.
    ///
    /// # Errors
    /// [`StoreError::TableNotFound`].
    pub fn table(&self, name: &str) -> StoreResult<Arc<Table>> {
        self.tables
            .get(name)
            .map(|t| t.clone())
            .ok_or_else(|| StoreError::TableNotFound(name.to_owned()))
    }

    /// Every table, by name (`ets:all`).
    pub fn tables(&self) -> Vec<Arc<Table>> {
        let mut all: Vec<Arc<Table>> = self.tables.iter().map(|t| t.clone()).collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// Sets the server-wide memory limit in bytes (0 for none). Past it,
    /// writes that would grow memory fail with `memory_limit`, except in
    /// `lru` tables, which evict instead.
    pub fn set_memory_limit(&self, bytes: u64) {
        self.shared.memory.set_limit(bytes);
    }

    /// The server's one memory accounting, for the layers that hold
    /// memory for clients besides the tables.
    pub fn memory(&self) -> &Arc<MemoryUse> {
        &self.shared.memory
    }

    /// Estimated bytes held by all tables.
    pub fn memory_bytes(&self) -> u64 {
        self.shared.memory.of(MemoryKind::Tables)
    }

    /// The last version handed out.
    pub fn revision(&self) -> u64 {
        self.shared
            .revision
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Makes later versions exceed `seen` (versions read back from disk), so
    /// an ETag issued before a restart never matches a different entry after.
    pub fn observe_revision(&self, seen: u64) {
        self.shared.revision.fetch_max(seen, Ordering::AcqRel);
    }

    /// How far revisions may go now (see the `lease` module).
    pub fn revision_lease(&self) -> u64 {
        self.shared.lease.limit()
    }

    /// Lets revisions go up to `limit`, which the durable tier has stored.
    pub fn set_revision_lease(&self, limit: u64) {
        self.shared.lease.set(limit);
    }

    /// What to call when the revisions handed out near the lease: the
    /// durable tier then stores a higher one and calls
    /// [`Store::set_revision_lease`], soon (`false`) or before returning
    /// (`true`, when a writer is past the lease).
    pub fn on_revision_lease_low(&self, ask: Box<dyn Fn(bool) + Send + Sync>) {
        self.shared.lease.on_low(ask);
    }

    /// Whether the lease needs moving.
    pub fn revision_lease_wanted(&self) -> bool {
        self.shared.lease.wanted()
    }

    /// Tables with a durable tier.
    pub fn persistent_tables(&self) -> Vec<Arc<Table>> {
        self.tables
            .iter()
            .filter(|t| t.persistence().is_local_durable())
            .map(|t| t.clone())
            .collect()
    }

    /// Sets how many keys of transactions a table groups before its
    /// write-back runs at once (`--max-grouped-keys`).
    pub fn set_max_grouped_keys(&self, keys: usize) {
        self.shared
            .max_grouped
            .store(keys, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets how many stale copies each table keeps at most
    /// (`--max-stale-entries`); past it, expiring entries are not kept.
    pub fn set_max_stale(&self, entries: usize) {
        self.shared
            .max_stale
            .store(entries, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets how much history each table keeps for its watchers, from the
    /// next table first watched on.
    pub fn set_watch_limits(&self, limits: HistoryLimits) {
        *self
            .shared
            .watch_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = limits;
    }

    /// Ends every watch of every table (the server is stopping): each
    /// stream sends what its reader has not read yet, then ends.
    pub fn close_watches(&self) {
        let hubs = std::mem::take(
            &mut *self
                .shared
                .hubs
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for hub in hubs.iter().filter_map(std::sync::Weak::upgrade) {
            hub.close();
        }
    }

    /// Frees the history of every hub nobody has watched for its
    /// retention time (see [`Hub::retire_if_idle`]); returns how many.
    pub fn retire_idle_watches(&self) -> usize {
        let hubs: Vec<Arc<Hub>> = self
            .shared
            .hubs()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect();
        hubs.iter().filter(|h| h.retire_if_idle()).count()
    }

    /// How many tables exist.
    pub fn table_count(&self) -> usize {
        self.tables.len()
    }
}

impl TableSpec {
    /// A spec with defaults for everything but the name and owner.
    pub fn new(name: impl Into<String>, kind: TableType, owner: impl Into<String>) -> Self {
        TableSpec {
            name: name.into(),
            settings: TableSettings {
                kind,
                ..TableSettings::default()
            },
            owner: owner.into(),
            created_at: 0,
        }
    }

    /// Checks the settings and fills in the defaults that depend on others.
    ///
    /// # Errors
    /// [`StoreError::InvalidArgument`] naming the first bad setting.
    pub fn validated(mut self) -> StoreResult<Self> {
        validate_table_name(&self.name)?;
        match (self.settings.persistence, self.settings.auto_save_ms) {
            (Persistence::Periodic, None) => {
                self.settings.auto_save_ms = Some(DEFAULT_AUTO_SAVE_MS)
            }
            (Persistence::Periodic, Some(ms)) => check_auto_save_ms(ms)?,
            (_, Some(_)) => {
                return Err(StoreError::InvalidArgument(
                    "auto_save_ms applies to persistence \"periodic\" only".into(),
                ))
            }
            (_, None) => {}
        }
        if let Some(ttl) = self.settings.default_ttl_ms {
            check_ttl_ms(ttl)?;
        }
        if let Some(max) = self.settings.max_entries {
            check_max_entries(max)?;
        }
        if self.settings.values == ValueKind::Any && !self.settings.kind.is_single() {
            return Err(StoreError::InvalidArgument(
                "values \"any\" needs a set or ordered_set table".into(),
            ));
        }
        if let Some(origin) = &self.settings.origin {
            for (what, ms) in [
                ("origin.ttl_ms", origin.ttl_ms),
                (
                    "origin.stale_if_error_ms",
                    origin.stale_if_error_ms.unwrap_or(1),
                ),
                ("origin.negative_ttl_ms", origin.negative_ttl_ms),
                ("origin.timeout_ms", origin.timeout_ms),
            ] {
                if ms == 0 || ms > MAX_TTL_MS {
                    return Err(StoreError::InvalidArgument(format!(
                        "{what} must be between 1 and {MAX_TTL_MS}"
                    )));
                }
            }
            if !self.settings.kind.is_single() {
                return Err(StoreError::InvalidArgument(
                    "an origin needs a set or ordered_set table".into(),
                ));
            }
            // A node keeps stale copies of what expires in its own memory;
            // a cluster table's rows expire in PostgreSQL, out of its sight.
            if origin.stale_if_error_ms.is_some()
                && self.settings.persistence == Persistence::Cluster
            {
                return Err(StoreError::InvalidArgument(
                    "origin.stale_if_error_ms is not available on cluster tables".into(),
                ));
            }
        }
        Ok(self)
    }
}

/// Checks a TTL in milliseconds: 1 to [`MAX_TTL_MS`].
///
/// # Errors
/// [`StoreError::InvalidArgument`].
pub fn check_ttl_ms(ms: u64) -> StoreResult<()> {
    if ms == 0 || ms > MAX_TTL_MS {
        return Err(StoreError::InvalidArgument(format!(
            "ttl_ms must be between 1 and {MAX_TTL_MS}"
        )));
    }
    Ok(())
}

/// Checks an `auto_save_ms`: 1 to [`MAX_AUTO_SAVE_MS`].
///
/// # Errors
/// [`StoreError::InvalidArgument`].
pub fn check_auto_save_ms(ms: u64) -> StoreResult<()> {
    if ms == 0 || ms > MAX_AUTO_SAVE_MS {
        return Err(StoreError::InvalidArgument(format!(
            "auto_save_ms must be between 1 and {MAX_AUTO_SAVE_MS}"
        )));
    }
    Ok(())
}

/// Checks a `max_entries`: at least 1.
///
/// # Errors
/// [`StoreError::InvalidArgument`].
pub fn check_max_entries(max: u64) -> StoreResult<()> {
    if max == 0 || max > i64::MAX as u64 {
        return Err(StoreError::InvalidArgument(
            "max_entries must be at least 1".into(),
        ));
    }
    Ok(())
}
