//! One table: its settings, its objects, and the ETS operations on them.
//!
//! # Layout
//! Objects live in a [`SlotMap`] keyed by the key text, sharded 64 ways.
//! `ordered_set` tables also keep a lock-free skip list of their keys
//! ([`SkipSet`]) for range scans. Point operations, counters included, go
//! through the map only and are atomic under the key's shard lock; scans walk
//! the skip list and look each key up, so they never block writers.
//!
//! # Invariants
//! - A key is in the skip list exactly when it is in the map. Both change only
//!   while the key's shard write lock is held, so they cannot disagree.
//! - `size` is the number of stored objects and `memory` the estimated bytes;
//!   both are adjusted under the same lock as the change they describe.
//! - Expired slots may sit in the map until something removes them, but no
//!   operation ever treats one as present.
//!
//! # Locking
//! Never hold a map guard across `.await` or while touching the same map; the
//! helpers below take and release shard locks within one call.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use crossbeam_skiplist::SkipSet;
use dashmap::DashMap;

use super::counter::{merge_patch, CounterOp};
use super::error::{StoreError, StoreResult};
use super::slot::{
    object_bytes, unix_seconds, Entry, Object, Objects, ObjectsMut, ObjectsRef, Slot, Stamp,
    KEY_OVERHEAD, ORDERED_INDEX_OVERHEAD,
};
use super::slots::{MapEntry, OccupiedEntry, SlotMap, VacantEntry};
use super::types::{Access, Eviction, Expiry, Origin, Persistence, TableSettings, TableType};
use super::value::{Key, Value};
use super::watch::{Change, ChangeKind, Hub, Recording, Start};
use super::Shared;
use super::{MemoryKind, MemoryUse};
use crate::stripe::Striped;

mod account;
mod bulk;
mod counters;
mod read;
mod stale;

pub use stale::DEFAULT_MAX_STALE;
mod txn;
mod upkeep;
mod watching;
mod write;

/// A table's identity and settings: what it was created with (settings
/// that `PATCH` changed included), stored durably for persistent tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// Table name, already validated.
    pub name: String,
    /// What the creator chose.
    pub settings: TableSettings,
    /// Principal that owns the table.
    pub owner: String,
    /// Creation time, Unix milliseconds.
    pub created_at: u64,
}

/// Per-table counters, reported in table info.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reads that found a live entry.
    pub hits: Counter,
    /// Reads that found nothing.
    pub misses: Counter,
    /// Objects inserted.
    pub inserts: Counter,
    /// Objects removed by delete, delete_object, take or clear.
    pub deletes: Counter,
    /// Keys removed because their deadline passed.
    pub expired: Counter,
    /// Keys removed to make room under `max_entries`.
    pub evicted: Counter,
    /// Requests made to the table's origin.
    pub origin_fetches: Counter,
    /// Origin requests that failed or timed out.
    pub origin_errors: Counter,
    /// Misses answered with a stale copy because the origin failed.
    pub stale_served: Counter,
}

/// A counter that every request of a table may add to, striped (see
/// [`crate::stripe`]) so that cores adding at once do not contend for one
/// cache line; a read sums the stripes. Same method names as `AtomicU64`, so
/// call sites read as before.
#[derive(Debug, Default)]
pub struct Counter(Striped<AtomicU64>);

impl Counter {
    /// Adds `n`.
    pub fn fetch_add(&self, n: u64, order: Ordering) {
        self.0.mine().fetch_add(n, order);
    }

    /// Subtracts `n` (a stripe may wrap; the sum does not).
    pub fn fetch_sub(&self, n: u64, order: Ordering) {
        self.0.mine().fetch_sub(n, order);
    }

    /// The total.
    pub fn load(&self, order: Ordering) -> u64 {
        self.0
            .all()
            .fold(0u64, |sum, s| sum.wrapping_add(s.load(order)))
    }
}

/// A condition a write must meet, from `If-Match` / `If-None-Match`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Precondition {
    /// Unconditional.
    #[default]
    None,
    /// The key must be absent (`If-None-Match: *`, ETS `insert_new`).
    Absent,
    /// The key must exist (`If-Match: *`).
    Exists,
    /// The key must exist at one of these versions (`If-Match: "v"`).
    Version(Vec<u64>),
}

impl Precondition {
    fn check(&self, live: Option<&Slot>) -> StoreResult<()> {
        self.check_version(live.map(|s| s.version))
    }

    /// Checks the condition against the version of the key's live entry,
    /// `None` when the key is absent or expired.
    ///
    /// # Errors
    /// [`StoreError::PreconditionFailed`].
    pub fn check_version(&self, live: Option<u64>) -> StoreResult<()> {
        let ok = match (self, live) {
            (Precondition::None, _) => true,
            (Precondition::Absent, found) => found.is_none(),
            (Precondition::Exists, found) => found.is_some(),
            (Precondition::Version(vs), Some(version)) => vs.contains(&version),
            (Precondition::Version(_), None) => false,
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::PreconditionFailed(match self {
                Precondition::Absent => "the key already exists",
                Precondition::Exists => "the key does not exist",
                _ => "the entry changed or is absent",
            }))
        }
    }
}

/// What a successful write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Whether the key was absent before.
    pub created: bool,
    /// The key's version after the write (its new ETag).
    pub version: u64,
    /// Objects this write counted in `stats.inserts` (0 for a no-op).
    pub inserted: u64,
}

/// Why a key left the map; decides which statistic counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    Deleted,
    Expired,
    Evicted,
    /// Undoing part of a failed bulk insert; counts nowhere.
    Undo,
}

/// Keys changed in memory but not yet written to the durable tier, kept by
/// persistent tables only.
///
/// # Locking
/// A mark is set while the key's shard lock in the table map is held, so it
/// is ordered with the change it describes. The write-back worker never holds
/// a guard of this map while reading the table map, so the two lock orders
/// cannot deadlock.
#[derive(Debug, Default)]
pub struct Dirty {
    /// Key → version of its latest change (a fresh version for removals).
    pub keys: DashMap<Key, u64>,
    /// Unix ms at which the set last went from clean to dirty; 0 when clean.
    /// Periodic write-back is due `auto_save_ms / 2` after this.
    pub since_ms: AtomicU64,
    /// Unix ms of the last completed write-back; 0 before the first.
    pub last_saved_at: AtomicU64,
    /// The revision of the latest clear not yet saved, 0 when none: every
    /// stored record at or below it is gone.
    pub cleared_at: AtomicU64,
    /// `sync` tables only: each dirty key's state as last saved (`None`:
    /// absent), so that the changes of a round that fails to reach disk
    /// can be undone. Changed under the key's shard lock.
    pub saved: Option<DashMap<Key, Option<Slot>>>,
    /// Keys changed together by a transaction, one group per
    /// transaction: the round that writes them puts each group in one
    /// atomic batch, so a crash keeps all of a transaction or none of it.
    pub groups: Mutex<Vec<Vec<Key>>>,
    /// Keys in `groups`, for its bound ([`MAX_GROUPED_KEYS`]).
    pub grouped_keys: std::sync::atomic::AtomicUsize,
}

/// Most keys of a table's transactions waiting in [`Dirty::groups`]
/// unless `--max-grouped-keys` says otherwise: past it the table's
/// write-back is due at once, so the groups of a rarely saved `periodic`
/// table cannot grow without end.
pub const MAX_GROUPED_KEYS: usize = 65_536;

impl Dirty {
    /// Bookkeeping for a table of `persistence`.
    fn for_table(persistence: Persistence) -> Self {
        Dirty {
            saved: (persistence == Persistence::Sync).then(DashMap::new),
            ..Dirty::default()
        }
    }

    /// Notes `before` as the last saved state of `key` if the key was clean
    /// (a dirty key's saved state is already noted). Under its shard lock.
    fn note_saved(&self, key: &str, before: Option<&Slot>) {
        if let Some(saved) = &self.saved {
            if !saved.contains_key(key) {
                saved.insert(Key::from(key), before.cloned());
            }
        }
    }

    fn mark(&self, key: &str, version: u64, now: u64) {
        self.keys.insert(Key::from(key), version);
        self.due_from(now);
    }

    /// A clear at `revision`: one mark for the durable tier instead of a
    /// removal per key.
    fn cleared(&self, revision: u64, now: u64) {
        self.cleared_at.fetch_max(revision, Ordering::AcqRel);
        self.due_from(now);
    }

    /// Notes keys a transaction changed together. Returns true when the
    /// groups are past `max` keys and the table's write-back should run
    /// now.
    fn group(&self, keys: Vec<Key>, max: usize) -> bool {
        let n = keys.len();
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(keys);
        let total = self.grouped_keys.fetch_add(n, Ordering::AcqRel) + n;
        if total > max {
            self.since_ms.store(1, Ordering::Release);
            return true;
        }
        false
    }

    /// Gives back groups a failed round took: their keys stay dirty.
    pub fn return_groups(&self, groups: Vec<Vec<Key>>) {
        if groups.is_empty() {
            return;
        }
        let n: usize = groups.iter().map(Vec::len).sum();
        self.groups
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(groups);
        self.grouped_keys.fetch_add(n, Ordering::AcqRel);
    }

    /// The groups noted so far, for the round that writes them.
    pub fn take_groups(&self) -> Vec<Vec<Key>> {
        let groups =
            std::mem::take(&mut *self.groups.lock().unwrap_or_else(PoisonError::into_inner));
        self.grouped_keys.store(0, Ordering::Release);
        groups
    }

    fn due_from(&self, now: u64) {
        let _ = self
            .since_ms
            .compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Relaxed);
    }
}

/// Settings that `PATCH` may change, kept in atomics because hot paths read them.
#[derive(Debug)]
struct LiveSettings {
    /// 0 when not periodic.
    auto_save_ms: AtomicU64,
    /// 0 for no default TTL.
    default_ttl_ms: AtomicU64,
    /// 0 for no limit.
    max_entries: AtomicU64,
    /// 0 = none, 1 = lru.
    eviction: AtomicU8,
}

/// One table. Shared as `Arc<Table>`; every method takes `&self`.
pub struct Table {
    name: Arc<str>,
    /// The settings the table was created with; those in `settings` below
    /// are kept current there instead.
    fixed: TableSettings,
    created_at: u64,
    /// Owner principal; changes only by give-away, so reads vastly dominate.
    owner: RwLock<Arc<str>>,
    settings: LiveSettings,
    /// Key -> objects. See the module docs for the locking rules.
    map: SlotMap,
    /// Sorted keys, for `ordered_set` only.
    index: Option<SkipSet<Box<[u8]>>>,
    /// Stored objects.
    size: AtomicI64,
    /// Estimated bytes held by the table's objects.
    memory: AtomicI64,
    /// Counters shown in table info.
    pub stats: Stats,
    /// Ticks once per key use in `lru` tables; orders `Slot::last_access`.
    /// Wraps at 2^32; eviction compares ages, which survive the wrap.
    access_clock: AtomicU32,
    /// Write-back bookkeeping; `None` for memory-only tables.
    dirty: Option<Dirty>,
    /// `(deadline, key)` of every key with a TTL, soonest first, for the
    /// sweeper. Changed only under the key's shard lock, like `index`.
    deadlines: SkipSet<(u64, Key)>,
    /// The change feed, made when the table is first watched.
    hub: OnceLock<Arc<Hub>>,
    /// Held shared (each thread its own stripe) by every single-key
    /// operation, `clear` and a watch's start, and exclusively by a
    /// transaction: nobody sees a transaction half applied.
    step_gate: Striped<RwLock<()>>,
    /// Set while a transaction runs: changes go to `txn_events` until it
    /// commits (published together) or aborts (dropped).
    in_txn: std::sync::atomic::AtomicBool,
    /// The running transaction's events, held back until it commits.
    txn_events: Mutex<Vec<Change>>,
    /// Expired entries kept for `origin.stale_if_error_ms`; `None` when
    /// the table has no such origin.
    stale: Option<stale::StaleCopies>,
    /// Set once the table is dropped; held while a hub is made, so no
    /// hub appears on a dropped table.
    dropped: Mutex<bool>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.name)
            .field("kind", &self.fixed.kind)
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

impl Table {
    pub(crate) fn new(spec: TableSpec, shared: Arc<Shared>) -> Self {
        let map = SlotMap::default();
        let live = &spec.settings;
        Table {
            name: spec.name.into(),
            created_at: spec.created_at,
            owner: RwLock::new(spec.owner.into()),
            settings: LiveSettings {
                auto_save_ms: AtomicU64::new(live.auto_save_ms.unwrap_or(0)),
                default_ttl_ms: AtomicU64::new(live.default_ttl_ms.unwrap_or(0)),
                max_entries: AtomicU64::new(live.max_entries.unwrap_or(0)),
                eviction: AtomicU8::new(matches!(live.eviction, Eviction::Lru) as u8),
            },
            map,
            index: (live.kind == TableType::OrderedSet).then(SkipSet::new),
            size: AtomicI64::new(0),
            memory: AtomicI64::new(0),
            stats: Stats::default(),
            access_clock: AtomicU32::new(0),
            dirty: spec
                .settings
                .persistence
                .is_local_durable()
                .then(|| Dirty::for_table(spec.settings.persistence)),
            deadlines: SkipSet::new(),
            hub: OnceLock::new(),
            step_gate: Striped::default(),
            in_txn: std::sync::atomic::AtomicBool::new(false),
            txn_events: Mutex::new(Vec::new()),
            dropped: Mutex::new(false),
            stale: live
                .origin
                .as_ref()
                .and_then(|o| o.stale_if_error_ms)
                .filter(|_| live.kind.is_single())
                .map(|window| stale::StaleCopies::new(window, shared.memory.clone())),
            fixed: spec.settings,
            shared,
        }
    }

    // ----- settings -------------------------------------------------------

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The ETS table type.
    pub fn kind(&self) -> TableType {
        self.fixed.kind
    }

    /// Who may read and write.
    pub fn access(&self) -> Access {
        self.fixed.access
    }

    /// The durability mode.
    pub fn persistence(&self) -> Persistence {
        self.fixed.persistence
    }

    /// The read-through origin, if any.
    pub fn origin(&self) -> Option<&Origin> {
        self.fixed.origin.as_ref()
    }

    /// Whether the table keeps raw bytes as well as JSON (`"values": "any"`).
    pub fn raw_values(&self) -> bool {
        self.fixed.values == super::ValueKind::Any
    }

    /// Whether shared caches may keep this table's entry answers.
    pub fn cache_public(&self) -> bool {
        self.fixed.cache == super::CacheScope::Public
    }

    /// The owning principal.
    pub fn owner(&self) -> Arc<str> {
        self.owner
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Hands the table to another principal (`ets:give_away`).
    pub fn set_owner(&self, owner: &str) {
        *self.owner.write().unwrap_or_else(PoisonError::into_inner) = owner.into();
    }

    /// The settings as they are now, in creation form.
    pub fn spec(&self) -> TableSpec {
        let opt = |v: u64| (v != 0).then_some(v);
        TableSpec {
            name: self.name.to_string(),
            settings: TableSettings {
                auto_save_ms: opt(self.settings.auto_save_ms.load(Ordering::Relaxed)),
                default_ttl_ms: opt(self.settings.default_ttl_ms.load(Ordering::Relaxed)),
                max_entries: opt(self.settings.max_entries.load(Ordering::Relaxed)),
                eviction: self.eviction(),
                ..self.fixed.clone()
            },
            owner: self.owner().to_string(),
            created_at: self.created_at,
        }
    }

    /// `periodic` tables: the longest an acknowledged write may stay only in
    /// memory, in milliseconds.
    pub fn auto_save_ms(&self) -> Option<u64> {
        match self.settings.auto_save_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// What happens at `max_entries`.
    pub fn eviction(&self) -> Eviction {
        if self.settings.eviction.load(Ordering::Relaxed) == 1 {
            Eviction::Lru
        } else {
            Eviction::None
        }
    }

    /// Applies changed settings; the caller has validated them.
    pub fn set_auto_save_ms(&self, ms: u64) {
        self.settings.auto_save_ms.store(ms, Ordering::Relaxed);
    }

    /// Sets or clears (`None`) the default TTL for later writes.
    pub fn set_default_ttl_ms(&self, ms: Option<u64>) {
        self.settings
            .default_ttl_ms
            .store(ms.unwrap_or(0), Ordering::Relaxed);
    }

    /// Sets or clears (`None`) the object limit. Lowering it below the current
    /// size refuses growth (or evicts, for `lru`) from the next write on.
    pub fn set_max_entries(&self, max: Option<u64>) {
        self.settings
            .max_entries
            .store(max.unwrap_or(0), Ordering::Relaxed);
    }

    /// Changes the eviction policy.
    pub fn set_eviction(&self, eviction: Eviction) {
        self.settings
            .eviction
            .store(matches!(eviction, Eviction::Lru) as u8, Ordering::Relaxed);
    }

    /// The default TTL of writes that name none, if any.
    pub fn default_ttl_ms(&self) -> Option<u64> {
        match self.settings.default_ttl_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// The object limit, if any.
    pub fn spec_max_entries(&self) -> Option<u64> {
        match self.settings.max_entries.load(Ordering::Relaxed) {
            0 => None,
            max => Some(max),
        }
    }

    /// The access counter's current value, against which eviction takes
    /// keys' ages.
    pub(crate) fn access_stamp(&self) -> Stamp {
        self.access_clock.load(Ordering::Relaxed)
    }

    /// A fresh access stamp, for `lru` tables; 0 otherwise (nothing reads it).
    fn tick(&self) -> Stamp {
        if self.eviction() == Eviction::Lru {
            self.access_clock
                .fetch_add(1, Ordering::Relaxed)
                .wrapping_add(1)
        } else {
            0
        }
    }

    /// Stored objects (ETS `info(size)`).
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed).max(0) as u64
    }

    /// Estimated bytes the table holds: keys, objects and indexes as
    /// tracked on every change, with the map's bucket arrays counted as
    /// they really are (hash tables grow in doublings, so a per-key average
    /// would be off by up to a third).
    pub fn memory_bytes(&self) -> u64 {
        let keys = self.map.len() as i64;
        let tracked = self.memory.load(Ordering::Relaxed) - keys * KEY_OVERHEAD as i64;
        (tracked + self.map.bytes() as i64).max(0) as u64
    }

    /// The running estimate behind the server-wide memory limit: what
    /// [`Table::memory_bytes`] reports, but with an average bucket share per
    /// key. Zero exactly when the table is empty.
    pub fn tracked_bytes(&self) -> i64 {
        self.memory.load(Ordering::Relaxed)
    }

    /// Creation time, Unix milliseconds.
    pub fn created_at(&self) -> u64 {
        self.created_at
    }

    pub(crate) fn now(&self) -> u64 {
        self.shared.clock.now_ms()
    }

    /// The shared side of the step gate, taken by every public operation
    /// on one key: it waits while a transaction runs.
    fn step(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.step_gate
            .mine()
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn next_version(&self) -> u64 {
        let version = self.shared.revision.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.lease.check(version);
        version
    }

    /// The deadline for a write that names `ttl_ms` (or none) at `now`.
    fn deadline(&self, now: u64, ttl_ms: Option<u64>) -> u64 {
        let default = self.settings.default_ttl_ms.load(Ordering::Relaxed);
        super::rules::deadline(now, ttl_ms, default)
    }

    /// The deadline after a write that names no TTL and keeps the key
    /// (counter, merge patch): the table default restarts it, else it stays.
    fn refreshed_deadline(&self, now: u64, current: u64) -> u64 {
        let default = self.settings.default_ttl_ms.load(Ordering::Relaxed);
        super::rules::refreshed_deadline(now, current, default)
    }

    fn fresh_objects(&self, value: Value, version: u64) -> Objects {
        if self.fixed.kind.is_single() {
            Objects::One(value)
        } else {
            Objects::Many(Box::new(vec![Object {
                seq: version,
                value,
            }]))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_striped_counter_sums_exactly_across_threads() {
        let c = Arc::new(Counter::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        c.fetch_add(3, Ordering::Relaxed);
                        c.fetch_sub(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.load(Ordering::Relaxed), 8 * 10_000 * 2);
    }

    #[test]
    fn stale_copies_need_a_table_this_node_expires() {
        let spec = |persistence| TableSpec {
            name: "t".into(),
            settings: TableSettings {
                persistence,
                origin: Some(Origin {
                    url: "http://127.0.0.1:1/{key}".into(),
                    ttl_ms: 1000,
                    negative_ttl_ms: 1000,
                    timeout_ms: 1000,
                    headers: Default::default(),
                    refresh_ahead_ms: None,
                    stale_if_error_ms: Some(5000),
                }),
                ..TableSettings::default()
            },
            owner: "a".into(),
            created_at: 0,
        };
        for local in [Persistence::None, Persistence::Periodic, Persistence::Sync] {
            assert!(spec(local).validated().is_ok(), "{local:?}");
        }
        assert!(matches!(
            spec(Persistence::Cluster).validated(),
            Err(StoreError::InvalidArgument(m)) if m.contains("stale_if_error_ms")
        ));
    }
}
