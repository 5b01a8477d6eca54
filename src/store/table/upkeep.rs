//! What background work and the durable tier use: the sweeper's expiry
//! step, the write-back view of dirty keys, recovery's load, and the
//! internals scans walk.

use super::*;

impl Table {
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
        if slot.is_expired(now) || slot.objects().count() == 0 {
            return;
        }
        let count = slot.objects().count() as i64;
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
                    .fetch_add(count - old.objects().count() as i64, Ordering::Relaxed);
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
