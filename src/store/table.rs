//! One table: its settings, its objects, and the ETS operations on them.
//!
//! # Layout
//! Objects live in a [`DashMap`] keyed by the key text, sharded 64 ways.
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

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use crossbeam_skiplist::SkipSet;
use dashmap::mapref::entry::{Entry as MapEntry, OccupiedEntry, VacantEntry};
use dashmap::DashMap;

use super::counter::{merge_patch, CounterOp};
use super::error::{StoreError, StoreResult};
use super::slot::{
    Entry, Object, Objects, Slot, BUCKET_BYTES, BUCKET_ESTIMATE, KEY_OVERHEAD, OBJECT_OVERHEAD,
    ORDERED_INDEX_OVERHEAD,
};
use super::types::{Access, Eviction, Origin, Persistence, TableType};
use super::value::{Key, Value};
use super::Shared;

/// Shards per table map. A cursor scan over a hashed table reads one shard per
/// page, so more shards keep pages cheap on big tables; 64 keeps an empty
/// table near 8 KiB.
pub const SHARDS: usize = 64;

/// What a table was created with; stored durably for persistent tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpec {
    /// Table name, already validated.
    pub name: String,
    /// ETS table type.
    pub kind: TableType,
    /// Who may read and write.
    pub access: Access,
    /// Durability mode.
    pub persistence: Persistence,
    /// `periodic` only: longest time an acknowledged write may stay only in memory.
    pub auto_save_ms: Option<u64>,
    /// TTL for writes that name none, in milliseconds.
    pub default_ttl_ms: Option<u64>,
    /// Most objects the table may hold.
    pub max_entries: Option<u64>,
    /// What happens at `max_entries`.
    pub eviction: Eviction,
    /// Read-through source.
    pub origin: Option<Origin>,
    /// Principal that owns the table.
    pub owner: String,
    /// Creation time, Unix milliseconds.
    pub created_at: u64,
}

/// Per-table counters, reported in table info.
#[derive(Debug, Default)]
pub struct Stats {
    /// Reads that found a live entry.
    pub hits: AtomicU64,
    /// Reads that found nothing.
    pub misses: AtomicU64,
    /// Objects inserted.
    pub inserts: AtomicU64,
    /// Objects removed by delete, delete_object, take or clear.
    pub deletes: AtomicU64,
    /// Keys removed because their deadline passed.
    pub expired: AtomicU64,
    /// Keys removed to make room under `max_entries`.
    pub evicted: AtomicU64,
    /// Requests made to the table's origin.
    pub origin_fetches: AtomicU64,
    /// Origin requests that failed or timed out.
    pub origin_errors: AtomicU64,
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
        let ok = match (self, live) {
            (Precondition::None, _) => true,
            (Precondition::Absent, found) => found.is_none(),
            (Precondition::Exists, found) => found.is_some(),
            (Precondition::Version(vs), Some(slot)) => vs.contains(&slot.version),
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
}

impl Dirty {
    fn mark(&self, key: &str, version: u64, now: u64) {
        self.keys.insert(Key::from(key), version);
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
    kind: TableType,
    access: Access,
    persistence: Persistence,
    origin: Option<Origin>,
    created_at: u64,
    /// Owner principal; changes only by give-away, so reads vastly dominate.
    owner: RwLock<Arc<str>>,
    settings: LiveSettings,
    /// Key -> objects. See the module docs for the locking rules.
    map: DashMap<Key, Slot>,
    /// Sorted keys, for `ordered_set` only.
    index: Option<SkipSet<Box<[u8]>>>,
    /// Stored objects.
    size: AtomicI64,
    /// Estimated bytes held by the table's objects.
    memory: AtomicI64,
    /// Counters shown in table info.
    pub stats: Stats,
    /// Ticks once per key use in `lru` tables; orders `Slot::last_access`.
    access_clock: AtomicU64,
    /// Write-back bookkeeping; `None` for memory-only tables.
    dirty: Option<Dirty>,
    /// `(deadline, key)` of every key with a TTL, soonest first, for the
    /// sweeper. Changed only under the key's shard lock, like `index`.
    deadlines: SkipSet<(u64, Key)>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

impl Table {
    pub(crate) fn new(spec: TableSpec, shared: Arc<Shared>) -> Self {
        let map = DashMap::with_hasher_and_shard_amount(Default::default(), SHARDS);
        Table {
            name: spec.name.into(),
            kind: spec.kind,
            access: spec.access,
            persistence: spec.persistence,
            origin: spec.origin,
            created_at: spec.created_at,
            owner: RwLock::new(spec.owner.into()),
            settings: LiveSettings {
                auto_save_ms: AtomicU64::new(spec.auto_save_ms.unwrap_or(0)),
                default_ttl_ms: AtomicU64::new(spec.default_ttl_ms.unwrap_or(0)),
                max_entries: AtomicU64::new(spec.max_entries.unwrap_or(0)),
                eviction: AtomicU8::new(matches!(spec.eviction, Eviction::Lru) as u8),
            },
            map,
            index: (spec.kind == TableType::OrderedSet).then(SkipSet::new),
            size: AtomicI64::new(0),
            memory: AtomicI64::new(0),
            stats: Stats::default(),
            access_clock: AtomicU64::new(0),
            dirty: (spec.persistence != Persistence::None).then(Dirty::default),
            deadlines: SkipSet::new(),
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
        self.kind
    }

    /// Who may read and write.
    pub fn access(&self) -> Access {
        self.access
    }

    /// The durability mode.
    pub fn persistence(&self) -> Persistence {
        self.persistence
    }

    /// The read-through origin, if any.
    pub fn origin(&self) -> Option<&Origin> {
        self.origin.as_ref()
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
            kind: self.kind,
            access: self.access,
            persistence: self.persistence,
            auto_save_ms: opt(self.settings.auto_save_ms.load(Ordering::Relaxed)),
            default_ttl_ms: opt(self.settings.default_ttl_ms.load(Ordering::Relaxed)),
            max_entries: opt(self.settings.max_entries.load(Ordering::Relaxed)),
            eviction: self.eviction(),
            origin: self.origin.clone(),
            owner: self.owner().to_string(),
            created_at: self.created_at,
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

    /// The object limit, if any.
    pub(crate) fn spec_max_entries(&self) -> Option<u64> {
        match self.settings.max_entries.load(Ordering::Relaxed) {
            0 => None,
            max => Some(max),
        }
    }

    /// A fresh access stamp, for `lru` tables; 0 otherwise (nothing reads it).
    fn tick(&self) -> u64 {
        if self.eviction() == Eviction::Lru {
            self.access_clock.fetch_add(1, Ordering::Relaxed) + 1
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
        let tracked = self.memory.load(Ordering::Relaxed) - keys * BUCKET_ESTIMATE as i64;
        let buckets: usize = self
            .map
            .shards()
            .iter()
            .map(|shard| {
                let guard = shard.read();
                if guard.capacity() == 0 {
                    0
                } else {
                    guard.buckets()
                }
            })
            .sum();
        (tracked + (buckets * BUCKET_BYTES) as i64).max(0) as u64
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

    fn next_version(&self) -> u64 {
        self.shared.revision.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The deadline for a write that names `ttl_ms` (or none) at `now`.
    fn deadline(&self, now: u64, ttl_ms: Option<u64>) -> u64 {
        match ttl_ms.or_else(|| {
            let d = self.settings.default_ttl_ms.load(Ordering::Relaxed);
            (d != 0).then_some(d)
        }) {
            Some(ms) => now.saturating_add(ms),
            None => 0,
        }
    }

    /// The deadline after a write that names no TTL and keeps the key
    /// (counter, merge patch): the table default restarts it, else it stays.
    fn refreshed_deadline(&self, now: u64, current: u64) -> u64 {
        match self.settings.default_ttl_ms.load(Ordering::Relaxed) {
            0 => current,
            d => now.saturating_add(d),
        }
    }

    fn fresh_objects(&self, value: Value, version: u64) -> Objects {
        if self.kind.is_single() {
            Objects::One(value)
        } else {
            Objects::Many(Box::new(vec![Object {
                seq: version,
                value,
            }]))
        }
    }

    // ----- accounting helpers (all run under the key's shard lock) ---------

    /// Reserves room for `n` more objects.
    ///
    /// # Errors
    /// [`StoreError::TableFull`] when the table does not evict and is full.
    fn grow(&self, n: u64) -> StoreResult<()> {
        let max = self.settings.max_entries.load(Ordering::Relaxed);
        if max == 0 || self.eviction() == Eviction::Lru {
            self.size.fetch_add(n as i64, Ordering::Relaxed);
            return Ok(());
        }
        let mut cur = self.size.load(Ordering::Relaxed);
        loop {
            if cur.max(0) as u64 + n > max {
                return Err(StoreError::TableFull(max));
            }
            match self.size.compare_exchange_weak(
                cur,
                cur + n as i64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => cur = actual,
            }
        }
    }

    fn shrink(&self, n: usize) {
        self.size.fetch_sub(n as i64, Ordering::Relaxed);
    }

    /// Estimated bytes a stored key costs this table, its indexes included.
    fn cost(&self, key_len: usize, slot: &Slot) -> i64 {
        let index = if self.index.is_some() {
            ORDERED_INDEX_OVERHEAD + key_len
        } else {
            0
        };
        (slot.footprint(key_len) + index) as i64
    }

    fn add_memory(&self, delta: i64) {
        self.memory.fetch_add(delta, Ordering::Relaxed);
        self.shared.memory.fetch_add(delta, Ordering::Relaxed);
    }

    /// Checks that growing by `delta` bytes fits the server-wide memory
    /// limit. Tables that evict may pass it and shed keys afterwards.
    ///
    /// # Errors
    /// [`StoreError::MemoryLimit`].
    fn admit(&self, delta: i64) -> StoreResult<()> {
        let limit = self.shared.memory_limit.load(Ordering::Relaxed);
        if delta <= 0 || limit == 0 || self.eviction() == Eviction::Lru {
            return Ok(());
        }
        let used = self.shared.memory.load(Ordering::Relaxed).max(0) as u64;
        if used.saturating_add(delta as u64) > limit {
            return Err(StoreError::MemoryLimit);
        }
        Ok(())
    }

    /// Whether the server is over its memory limit.
    pub(crate) fn over_memory(&self) -> bool {
        let limit = self.shared.memory_limit.load(Ordering::Relaxed);
        limit != 0 && self.shared.memory.load(Ordering::Relaxed).max(0) as u64 > limit
    }

    /// Stores a new key. The caller has reserved its objects with [`Self::grow`].
    fn insert_vacant(&self, v: VacantEntry<'_, Key, Slot>, slot: Slot) {
        self.mark_dirty(v.key(), slot.version);
        self.stats
            .inserts
            .fetch_add(slot.objects.count() as u64, Ordering::Relaxed);
        self.place_vacant(v, slot);
    }

    /// Puts a new key in the map and its indexes and counts its memory;
    /// object counts, statistics and dirty marks are the caller's.
    fn place_vacant(&self, v: VacantEntry<'_, Key, Slot>, slot: Slot) {
        if let Some(index) = &self.index {
            index.insert(v.key().as_bytes().into());
        }
        self.track_deadline(v.key(), 0, slot.expires_at);
        self.add_memory(self.cost(v.key().len(), &slot));
        drop(v.insert(slot));
    }

    /// Changes a stored key in place; object-count changes are the caller's.
    fn modify_occupied(&self, o: &mut OccupiedEntry<'_, Key, Slot>, f: impl FnOnce(&mut Slot)) {
        let key_len = o.key().len();
        let before = o.get().footprint(key_len) as i64;
        let deadline_before = o.get().expires_at;
        f(o.get_mut());
        self.track_deadline(o.key(), deadline_before, o.get().expires_at);
        *o.get_mut().last_access.get_mut() = self.tick();
        let after = o.get().footprint(key_len) as i64;
        self.add_memory(after - before);
        self.mark_dirty(o.key(), o.get().version);
    }

    /// Records a change for the durable tier; call under the key's shard lock.
    fn mark_dirty(&self, key: &str, version: u64) {
        if let Some(dirty) = &self.dirty {
            dirty.mark(key, version, self.now());
        }
    }

    /// Records a removal for the durable tier; call under the key's shard lock.
    fn mark_removed(&self, key: &str) {
        if self.dirty.is_some() {
            let version = self.next_version();
            self.mark_dirty(key, version);
        }
    }

    /// Moves the key in the sweeper's deadline index; call under the key's
    /// shard lock. Wakes the sweeper when the new deadline is earlier than
    /// the one it sleeps towards.
    fn track_deadline(&self, key: &str, old: u64, new: u64) {
        if old == new {
            return;
        }
        if old != 0 {
            self.deadlines.remove(&(old, Key::from(key)));
        }
        if new != 0 {
            self.deadlines.insert((new, Key::from(key)));
            self.shared.expiry.deadline_added(new);
        }
    }

    /// Removes a stored key, counting it under `why`.
    pub(crate) fn remove_occupied(
        &self,
        o: OccupiedEntry<'_, Key, Slot>,
        why: Removal,
    ) -> (Key, Slot) {
        if let Some(index) = &self.index {
            index.remove(o.key().as_bytes());
        }
        self.mark_removed(o.key());
        self.track_deadline(o.key(), o.get().expires_at, 0);
        let (key, slot) = o.remove_entry();
        self.account_removed(&key, &slot, why);
        (key, slot)
    }

    fn account_removed(&self, key: &str, slot: &Slot, why: Removal) {
        let n = slot.objects.count();
        self.shrink(n);
        self.add_memory(-self.cost(key.len(), slot));
        let stat = match why {
            Removal::Deleted => Some((&self.stats.deletes, n as u64)),
            Removal::Expired => Some((&self.stats.expired, 1)),
            Removal::Evicted => Some((&self.stats.evicted, 1)),
            Removal::Undo => None,
        };
        if let Some((counter, by)) = stat {
            counter.fetch_add(by, Ordering::Relaxed);
        }
    }

    /// The key's map entry with its shard write-locked, an expired occupant
    /// already removed (and counted), so callers see only live state.
    fn live_entry(&self, key: &str, now: u64) -> MapEntry<'_, Key, Slot> {
        let mut entry = self.map.entry(Key::from(key));
        loop {
            match entry {
                MapEntry::Occupied(o) if o.get().is_expired(now) => {
                    let (k, _) = self.remove_occupied(o, Removal::Expired);
                    entry = self.map.entry(k);
                }
                live => return live,
            }
        }
    }

    // ----- reads ----------------------------------------------------------

    /// The key's live objects (ETS `lookup`), without touching statistics.
    pub fn peek(&self, key: &str) -> Option<Entry> {
        let now = self.now();
        let slot = self.map.get(key)?;
        (!slot.is_expired(now)).then(|| Entry::of(&slot, now))
    }

    /// `lookup`, counted as a hit or a miss; a hit is a use for LRU.
    pub fn lookup(&self, key: &str) -> Option<Entry> {
        let now = self.now();
        let found = self.map.get(key).and_then(|slot| {
            if slot.is_expired(now) {
                return None;
            }
            if self.eviction() == Eviction::Lru {
                slot.last_access.store(self.tick(), Ordering::Relaxed);
            }
            Some(Entry::of(&slot, now))
        });
        let stat = if found.is_some() {
            &self.stats.hits
        } else {
            &self.stats.misses
        };
        stat.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Whether the key is present and live (ETS `member`).
    pub fn member(&self, key: &str) -> bool {
        let now = self.now();
        self.map.get(key).is_some_and(|s| !s.is_expired(now))
    }

    // ----- writes ---------------------------------------------------------

    /// `insert` of one object: replaces in set types, adds in bag types
    /// (unless identical, for `bag`). `ttl_ms` overrides the table default.
    ///
    /// # Errors
    /// [`StoreError::PreconditionFailed`], [`StoreError::TableFull`].
    pub fn insert(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> StoreResult<Written> {
        let written = self.insert_locked(key, value, ttl_ms, pre)?;
        if written.inserted > 0 {
            self.evict_if_needed();
        }
        Ok(written)
    }

    fn insert_locked(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> StoreResult<Written> {
        let now = self.now();
        let expires_at = self.deadline(now, ttl_ms);
        match self.live_entry(key, now) {
            MapEntry::Vacant(v) => {
                pre.check(None)?;
                self.admit(
                    (KEY_OVERHEAD
                        + OBJECT_OVERHEAD
                        + std::mem::size_of::<Object>()
                        + v.key().len()
                        + value.len()) as i64,
                )?;
                self.grow(1)?;
                let version = self.next_version();
                let slot = Slot::new(
                    self.fresh_objects(value, version),
                    version,
                    expires_at,
                    self.tick(),
                );
                self.insert_vacant(v, slot);
                Ok(Written {
                    created: true,
                    version,
                    inserted: 1,
                })
            }
            MapEntry::Occupied(mut o) => {
                pre.check(Some(o.get()))?;
                let adds = match (&o.get().objects, self.kind) {
                    (Objects::One(_), _) => false,
                    (Objects::Many(objs), TableType::Bag) => !objs.iter().any(|x| x.value == value),
                    (Objects::Many(_), _) => true,
                };
                if !adds && !self.kind.is_single() && o.get().expires_at == expires_at {
                    return Ok(Written {
                        created: false,
                        version: o.get().version,
                        inserted: 0,
                    });
                }
                let growth = match &o.get().objects {
                    Objects::One(old) => value.len() as i64 - old.len() as i64,
                    Objects::Many(_) if adds => {
                        (value.len() + OBJECT_OVERHEAD + std::mem::size_of::<Object>()) as i64
                    }
                    Objects::Many(_) => 0,
                };
                self.admit(growth)?;
                if adds {
                    self.grow(1)?;
                }
                let version = self.next_version();
                self.modify_occupied(&mut o, |slot| {
                    match &mut slot.objects {
                        Objects::One(v) => *v = value,
                        Objects::Many(objs) if adds => objs.push(Object {
                            seq: version,
                            value,
                        }),
                        Objects::Many(_) => {}
                    }
                    slot.version = version;
                    slot.expires_at = expires_at;
                });
                let inserted = u64::from(adds || self.kind.is_single());
                self.stats.inserts.fetch_add(inserted, Ordering::Relaxed);
                Ok(Written {
                    created: false,
                    version,
                    inserted,
                })
            }
        }
    }

    /// `insert/2` with a list: every item or none. Items are applied in
    /// order; if one fails (table full), the ones before it are undone and
    /// the error returned.
    ///
    /// # Errors
    /// [`StoreError::TableFull`].
    pub fn insert_many(&self, items: Vec<(String, Value, Option<u64>)>) -> StoreResult<usize> {
        let count = items.len();
        let mut undo: Vec<(String, Option<Slot>, Written)> = Vec::with_capacity(count);
        for (key, value, ttl) in items {
            let before = self.live_slot(&key);
            match self.insert(&key, value, ttl, &Precondition::None) {
                Ok(w) if before.as_ref().map(|b| b.version) == Some(w.version) => {}
                Ok(w) => undo.push((key, before, w)),
                Err(e) => {
                    fail::fail_point!("bulk-before-undo");
                    for (key, before, written) in undo.into_iter().rev() {
                        self.restore(&key, before, written);
                    }
                    return Err(e);
                }
            }
        }
        Ok(count)
    }

    /// Puts back what a key held before `written`, unless someone has
    /// written the key since.
    ///
    /// The restored content gets a fresh version, never the old one:
    /// versions only go forward, so a write-back round that wrote the
    /// undone value cannot mistake the restored key for one it already
    /// saved and clear its dirty mark.
    fn restore(&self, key: &str, before: Option<Slot>, written: Written) {
        let MapEntry::Occupied(mut o) = self.map.entry(Key::from(key)) else {
            return;
        };
        if o.get().version != written.version {
            return;
        }
        let inserted = o.get().objects.count();
        match before {
            None => {
                self.remove_occupied(o, Removal::Undo);
            }
            Some(mut prev) => {
                let restored = prev.objects.count();
                self.size
                    .fetch_add(restored as i64 - inserted as i64, Ordering::Relaxed);
                prev.version = self.next_version();
                self.modify_occupied(&mut o, |slot| *slot = prev);
            }
        }
        self.stats
            .inserts
            .fetch_sub(written.inserted, Ordering::Relaxed);
    }

    /// `delete/2`: removes the key. Returns whether it was present.
    ///
    /// # Errors
    /// [`StoreError::PreconditionFailed`].
    pub fn delete(&self, key: &str, pre: &Precondition) -> StoreResult<bool> {
        let now = self.now();
        match self.live_entry(key, now) {
            MapEntry::Vacant(_) => pre.check(None).map(|_| false),
            MapEntry::Occupied(o) => {
                pre.check(Some(o.get()))?;
                self.remove_occupied(o, Removal::Deleted);
                Ok(true)
            }
        }
    }

    /// `delete_object`: removes every object under `key` identical to `value`.
    /// Returns how many were removed.
    pub fn delete_object(&self, key: &str, value: &Value) -> usize {
        let now = self.now();
        let MapEntry::Occupied(mut o) = self.live_entry(key, now) else {
            return 0;
        };
        let (removed, left) = match &o.get().objects {
            Objects::One(v) => (usize::from(v == value), 0),
            Objects::Many(objs) => {
                let hits = objs.iter().filter(|x| &x.value == value).count();
                (hits, objs.len() - hits)
            }
        };
        if removed == 0 {
            return 0;
        }
        if left == 0 {
            self.remove_occupied(o, Removal::Deleted);
            return removed;
        }
        let version = self.next_version();
        self.modify_occupied(&mut o, |slot| {
            if let Objects::Many(objs) = &mut slot.objects {
                objs.retain(|x| &x.value != value);
            }
            slot.version = version;
        });
        self.shrink(removed);
        self.stats
            .deletes
            .fetch_add(removed as u64, Ordering::Relaxed);
        removed
    }

    /// `take`: removes the key and returns what it held.
    pub fn take(&self, key: &str) -> Option<Entry> {
        let now = self.now();
        match self.live_entry(key, now) {
            MapEntry::Vacant(_) => None,
            MapEntry::Occupied(o) => {
                let (_, slot) = self.remove_occupied(o, Removal::Deleted);
                Some(Entry::of(&slot, now))
            }
        }
    }

    /// `delete_all_objects`: empties the table shard by shard.
    pub fn clear(&self) {
        let now = self.now();
        self.map.retain(|key, slot| {
            if let Some(index) = &self.index {
                index.remove(key.as_bytes());
            }
            self.mark_removed(key);
            self.track_deadline(key, slot.expires_at, 0);
            let why = if slot.is_expired(now) {
                Removal::Expired
            } else {
                Removal::Deleted
            };
            self.account_removed(key, slot, why);
            false
        });
        // Give the emptied bucket arrays back, as ETS frees a cleared table.
        self.map.shrink_to_fit();
    }

    /// `update_counter/4`: atomically adds to an integer value (or member).
    ///
    /// # Errors
    /// [`StoreError::WrongTableType`] on bag types, [`StoreError::KeyNotFound`]
    /// without a default, [`StoreError::NotACounter`], [`StoreError::Overflow`],
    /// [`StoreError::TableFull`] when a default would add a key to a full table.
    pub fn update_counter(&self, key: &str, op: &CounterOp) -> StoreResult<i64> {
        let (n, created) = self.update_counter_locked(key, op)?;
        if created {
            self.evict_if_needed();
        }
        Ok(n)
    }

    fn update_counter_locked(&self, key: &str, op: &CounterOp) -> StoreResult<(i64, bool)> {
        if !self.kind.is_single() {
            return Err(StoreError::WrongTableType(
                "counters need a set or ordered_set table",
            ));
        }
        op.validate()?;
        let now = self.now();
        match self.live_entry(key, now) {
            MapEntry::Vacant(v) => {
                let start = op.default_value().ok_or(StoreError::KeyNotFound)?;
                let (value, n) = op.apply(&start)?;
                self.admit((KEY_OVERHEAD + OBJECT_OVERHEAD + v.key().len() + value.len()) as i64)?;
                self.grow(1)?;
                let version = self.next_version();
                let slot = Slot::new(
                    Objects::One(value),
                    version,
                    self.deadline(now, None),
                    self.tick(),
                );
                self.insert_vacant(v, slot);
                Ok((n, true))
            }
            MapEntry::Occupied(mut o) => {
                let Objects::One(current) = &o.get().objects else {
                    return Err(StoreError::WrongTableType("counters need a set table"));
                };
                let (value, n) = op.apply(current)?;
                self.admit(value.len() as i64 - current.len() as i64)?;
                let version = self.next_version();
                let expires_at = self.refreshed_deadline(now, o.get().expires_at);
                self.modify_occupied(&mut o, |slot| {
                    slot.objects = Objects::One(value);
                    slot.version = version;
                    slot.expires_at = expires_at;
                });
                Ok((n, false))
            }
        }
    }

    /// `update_element` as a JSON Merge Patch on an object value.
    ///
    /// # Errors
    /// [`StoreError::WrongTableType`] on bag types, [`StoreError::KeyNotFound`],
    /// [`StoreError::NotAnObject`], [`StoreError::PreconditionFailed`].
    pub fn merge(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> StoreResult<Entry> {
        if !self.kind.is_single() {
            return Err(StoreError::WrongTableType(
                "merge patch needs a set or ordered_set table",
            ));
        }
        let now = self.now();
        let MapEntry::Occupied(mut o) = self.live_entry(key, now) else {
            pre.check(None)?;
            return Err(StoreError::KeyNotFound);
        };
        pre.check(Some(o.get()))?;
        let Objects::One(current) = &o.get().objects else {
            return Err(StoreError::WrongTableType("merge patch needs a set table"));
        };
        let value = merge_patch(current, patch)?;
        self.admit(value.len() as i64 - current.len() as i64)?;
        let version = self.next_version();
        let expires_at = self.refreshed_deadline(now, o.get().expires_at);
        self.modify_occupied(&mut o, |slot| {
            slot.objects = Objects::One(value);
            slot.version = version;
            slot.expires_at = expires_at;
        });
        Ok(Entry::of(o.get(), now))
    }

    // ----- expiry ------------------------------------------------------------

    /// Removes up to `budget` keys whose deadline has passed at `now`,
    /// soonest first, counting each in `stats.expired`. Returns how many.
    pub fn purge_expired(&self, now: u64, budget: usize) -> usize {
        let mut removed = 0;
        while removed < budget {
            let Some(first) = self.deadlines.front() else {
                break;
            };
            let (deadline, key) = first.value().clone();
            drop(first);
            if deadline > now {
                break;
            }
            match self.map.entry(key.clone()) {
                MapEntry::Occupied(o) if o.get().expires_at == deadline => {
                    self.remove_occupied(o, Removal::Expired);
                    removed += 1;
                }
                // The key moved on between our look and our lock; whoever
                // moved it updated the index, so this entry is already stale.
                _ => {
                    self.deadlines.remove(&(deadline, key));
                }
            }
        }
        removed
    }

    /// The soonest deadline of any key, if any has one.
    pub fn next_deadline(&self) -> Option<u64> {
        self.deadlines.front().map(|e| e.value().0)
    }

    // ----- the durable tier's view ------------------------------------------

    /// Write-back bookkeeping, for persistent tables.
    pub fn dirty(&self) -> Option<&Dirty> {
        self.dirty.as_ref()
    }

    /// Objects changed in memory and not yet on disk (0 for memory tables).
    pub fn dirty_count(&self) -> u64 {
        self.dirty.as_ref().map_or(0, |d| d.keys.len() as u64)
    }

    /// A copy of the key's live slot: `None` when absent or expired. What the
    /// durable tier writes out, and what a failed bulk insert restores.
    pub fn live_slot(&self, key: &str) -> Option<Slot> {
        let now = self.now();
        let slot = self.map.get(key)?;
        (!slot.is_expired(now)).then(|| slot.clone())
    }

    /// Puts a key read back from disk into the table, without marking it
    /// dirty. Keys already present are replaced.
    pub fn load_slot(&self, key: &str, slot: Slot) {
        let now = self.now();
        if slot.is_expired(now) || slot.objects.count() == 0 {
            return;
        }
        let count = slot.objects.count() as i64;
        match self.map.entry(Key::from(key)) {
            MapEntry::Vacant(v) => {
                self.size.fetch_add(count, Ordering::Relaxed);
                self.place_vacant(v, slot);
            }
            MapEntry::Occupied(mut o) => {
                let key_len = o.key().len();
                self.track_deadline(o.key(), o.get().expires_at, slot.expires_at);
                let old = o.insert(slot);
                self.add_memory(o.get().footprint(key_len) as i64 - old.footprint(key_len) as i64);
                self.size
                    .fetch_add(count - old.objects.count() as i64, Ordering::Relaxed);
            }
        }
    }

    // ----- internals shared with scans -------------------------------------

    pub(crate) fn map(&self) -> &DashMap<Key, Slot> {
        &self.map
    }

    pub(crate) fn index(&self) -> Option<&SkipSet<Box<[u8]>>> {
        self.index.as_ref()
    }
}
