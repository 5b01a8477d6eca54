//! What background work and the durable tier use: the sweeper's expiry
//! step, the write-back view of dirty keys, recovery's load, and the
//! internals scans walk.

use super::*;

impl Table {
    /// Removes up to `budget` keys whose deadline has passed at `now`,
    /// soonest first, counting each in `stats.expired`. Returns how many.
    pub fn purge_expired(&self, now: u64, budget: usize) -> usize {
        let _step = self.step();
        self.purge_stale(now);
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

    /// After a round saved `key` as `written` (its state when the round
    /// read it) for the change `version`: the key is clean if nothing
    /// changed it since; otherwise `written` is now its saved state. Under
    /// the key's shard lock, so no change slips between the two.
    pub fn saved(&self, key: &Key, version: u64, written: Option<Slot>) {
        let Some(dirty) = &self.dirty else {
            return;
        };
        let Some(saved) = &dirty.saved else {
            dirty.keys.remove_if(key, |_, current| *current == version);
            return;
        };
        let _shard = self.map.write(self.map.shard_of(self.map.hash(key)));
        if dirty
            .keys
            .remove_if(key, |_, current| *current == version)
            .is_some()
        {
            saved.remove(key);
        } else {
            saved.insert(key.clone(), written);
        }
    }

    /// After a round of a `sync` table failed to reach disk: puts every
    /// key changed since its last save back as it was saved, with every
    /// shard locked, so that no request sees an unsaved change once its
    /// writer has been told it failed. The keys stay dirty: the next round
    /// writes their saved state again, over whatever the failed one left.
    /// No event is sent (watchers of a `sync` table are sent a `reset`).
    /// Returns how many keys were put back.
    pub fn undo_unsaved(&self) -> usize {
        let Some(saved) = self.dirty.as_ref().and_then(|d| d.saved.as_ref()) else {
            return 0;
        };
        let mut shards: Vec<_> = self.map.write_all();
        let now = self.now();
        let keys: Vec<(Key, Option<Slot>)> = saved
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        for (key, before) in &keys {
            // The shard locks are held: reach the key directly.
            let hash = self.map.hash(key);
            let shard = &mut *shards[self.map.shard_of(hash)];
            let current = shard.remove(hash, key);
            if let Some((k, slot)) = current {
                if let Some(index) = &self.index {
                    index.remove(k.as_bytes());
                }
                self.track_deadline(&k, slot.expires_at, 0);
                self.shrink(slot.objects().count());
                self.add_memory(-self.cost(k.len(), &slot));
            }
            if let Some(before) = before.clone().filter(|b| !b.is_expired(now)) {
                if let Some(index) = &self.index {
                    index.insert(key.as_bytes().into());
                }
                self.track_deadline(key, 0, before.expires_at);
                self.size
                    .fetch_add(before.objects().count() as i64, Ordering::Relaxed);
                self.add_memory(self.cost(key.len(), &before));
                shard.insert_new(hash, key.clone(), before);
            }
        }
        keys.len()
    }

    /// Keys of transactions waiting to be written back as groups (0 for
    /// memory tables).
    pub fn grouped_keys(&self) -> u64 {
        self.dirty.as_ref().map_or(0, |d| {
            d.grouped_keys.load(std::sync::atomic::Ordering::Relaxed) as u64
        })
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
    pub fn load_slot(&self, key: Key, slot: Slot) {
        let now = self.now();
        if slot.is_expired(now) || slot.objects().count() == 0 {
            return;
        }
        let count = slot.objects().count() as i64;
        match self.map.entry(key) {
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
                    .fetch_add(count - old.objects().count() as i64, Ordering::Relaxed);
            }
        }
    }

    // ----- internals shared with scans -------------------------------------

    pub(crate) fn map(&self) -> &SlotMap {
        &self.map
    }

    pub(crate) fn index(&self) -> Option<&SkipSet<Box<[u8]>>> {
        self.index.as_ref()
    }
}
