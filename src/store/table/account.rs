//! Bookkeeping under a key's shard lock: size and memory accounting, the
//! ordered index, deadlines and dirty marks kept in step with every change.

use super::*;

impl Table {
    /// Reserves room for `n` more objects.
    ///
    /// # Errors
    /// [`StoreError::TableFull`] when the table does not evict and is full.
    pub(super) fn grow(&self, n: u64) -> StoreResult<()> {
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

    pub(super) fn shrink(&self, n: usize) {
        self.size.fetch_sub(n as i64, Ordering::Relaxed);
    }

    /// Estimated bytes a stored key costs this table, its indexes included.
    pub(super) fn cost(&self, key_len: usize, slot: &Slot) -> i64 {
        let index = if self.index.is_some() {
            ORDERED_INDEX_OVERHEAD + key_len
        } else {
            0
        };
        (slot.footprint(key_len) + index) as i64
    }

    pub(super) fn add_memory(&self, delta: i64) {
        self.memory.fetch_add(delta, Ordering::Relaxed);
        self.shared.memory.add(MemoryKind::Tables, delta);
    }

    /// Checks that growing by `delta` bytes fits the server-wide memory
    /// limit. Tables that evict may pass it and shed keys afterwards.
    ///
    /// # Errors
    /// [`StoreError::MemoryLimit`].
    pub(super) fn admit(&self, delta: i64) -> StoreResult<()> {
        if delta <= 0 || self.eviction() == Eviction::Lru || self.shared.memory.fits(delta as u64) {
            return Ok(());
        }
        Err(StoreError::MemoryLimit)
    }

    /// Whether the server is over its memory limit.
    pub(crate) fn over_memory(&self) -> bool {
        self.shared.memory.over()
    }

    /// Stores a new key. The caller has reserved its objects with [`Self::grow`].
    pub(super) fn insert_vacant(&self, v: VacantEntry<'_>, slot: Slot) {
        self.note_saved(v.key(), None);
        self.mark_dirty(v.key(), slot.version);
        self.stats
            .inserts
            .fetch_add(slot.objects().count() as u64, Ordering::Relaxed);
        self.place_vacant(v, slot);
    }

    /// Puts a new key in the map and its indexes and counts its memory;
    /// object counts, statistics and dirty marks are the caller's.
    pub(super) fn place_vacant(&self, v: VacantEntry<'_>, slot: Slot) {
        if let Some(index) = &self.index {
            index.insert(v.key().as_bytes().into());
        }
        self.track_deadline(v.key(), 0, slot.expires_at);
        self.add_memory(self.cost(v.key().len(), &slot));
        drop(v.insert(slot));
    }

    /// Changes a stored key in place; object-count changes are the caller's.
    pub(super) fn modify_occupied(&self, o: &mut OccupiedEntry<'_>, f: impl FnOnce(&mut Slot)) {
        let key_len = o.key().len();
        self.note_saved(o.key(), Some(o.get()));
        let before = o.get().footprint(key_len) as i64;
        let deadline_before = o.get().expires_at;
        f(o.get_mut());
        self.track_deadline(o.key(), deadline_before, o.get().expires_at);
        o.get().touch(self.tick());
        let after = o.get().footprint(key_len) as i64;
        self.add_memory(after - before);
        self.mark_dirty(o.key(), o.get().version);
    }

    /// Notes the state of `key` before a change, for undoing the change if
    /// it never reaches disk (`sync` tables); under the key's shard lock.
    pub(super) fn note_saved(&self, key: &str, before: Option<&Slot>) {
        if let Some(dirty) = &self.dirty {
            dirty.note_saved(key, before);
        }
    }

    /// Records a change for the durable tier; call under the key's shard lock.
    pub(super) fn mark_dirty(&self, key: &str, version: u64) {
        if let Some(dirty) = &self.dirty {
            dirty.mark(key, version, self.now());
        }
    }

    /// Moves the key in the sweeper's deadline index; call under the key's
    /// shard lock. Wakes the sweeper when the new deadline is earlier than
    /// the one it sleeps towards.
    pub(super) fn track_deadline(&self, key: &str, old: u64, new: u64) {
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
    pub(crate) fn remove_occupied(&self, o: OccupiedEntry<'_>, why: Removal) -> (Key, Slot) {
        self.remove_noting(o, why, None)
    }

    /// [`Self::remove_occupied`], with the removed bag value the event names.
    pub(super) fn remove_noting(
        &self,
        o: OccupiedEntry<'_>,
        why: Removal,
        value: Option<Value>,
    ) -> (Key, Slot) {
        let change = self.begin_removal();
        self.note_saved(o.key(), Some(o.get()));
        if let Some(index) = &self.index {
            index.remove(o.key().as_bytes());
        }
        if let Some(change) = &change {
            self.mark_dirty(o.key(), change.revision);
        }
        self.track_deadline(o.key(), o.get().expires_at, 0);
        let (key, slot) = o.remove_entry();
        self.account_removed(&key, &slot, why);
        match why {
            Removal::Expired => self.keep_stale(&key, &slot),
            Removal::Deleted | Removal::Evicted => self.forget_stale(&key),
            Removal::Undo => {}
        }
        Self::removed(
            change,
            &key,
            why,
            value.filter(|_| !self.fixed.kind.is_single()),
        );
        (key, slot)
    }

    pub(super) fn account_removed(&self, key: &str, slot: &Slot, why: Removal) {
        let n = slot.objects().count();
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
    pub(super) fn live_entry(&self, key: &str, now: u64) -> MapEntry<'_> {
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
}
