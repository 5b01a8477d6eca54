//! Point reads: `lookup`, `member` and a read that counts nothing.

use super::*;

impl Table {
    /// The key's live objects (ETS `lookup`), without touching statistics.
    pub fn peek(&self, key: &str) -> Option<Entry> {
        let _step = self.step();
        self.peek_inner(key)
    }

    pub(super) fn peek_inner(&self, key: &str) -> Option<Entry> {
        let now = self.now();
        let slot = self.map.get(key)?;
        (!slot.is_expired(now)).then(|| Entry::of(&slot, now))
    }

    /// `lookup`, counted as a hit or a miss; a hit is a use for LRU.
    pub fn lookup(&self, key: &str) -> Option<Entry> {
        let _step = self.step();
        self.lookup_inner(key)
    }

    pub(super) fn lookup_inner(&self, key: &str) -> Option<Entry> {
        let now = self.now();
        let found = self.map.get(key).and_then(|slot| {
            if slot.is_expired(now) {
                return None;
            }
            if self.eviction() == Eviction::Lru {
                slot.touch(self.tick());
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
        let _step = self.step();
        let now = self.now();
        self.map.get(key).is_some_and(|s| !s.is_expired(now))
    }
}
