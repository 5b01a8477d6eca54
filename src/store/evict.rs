//! Approximate LRU eviction for tables with `eviction: lru`, when they pass
//! their `max_entries` or the server passes its memory limit, by sampling as
//! Redis does.
//!
//! Each use of a key stamps it with the table's access tick (a counter, so
//! order is exact even within one millisecond). When a write leaves the table
//! over its limit, the writer, after releasing its own shard lock, samples
//! [`EVICTION_SAMPLES`] random keys and removes the one used least recently
//! (an expired key first, counted as expired), until the table fits. Sampling
//! costs O(samples) per eviction whatever the table's size; its quality
//! against exact LRU is measured by the eviction tests.

use std::cell::Cell;
use std::hash::{BuildHasher, Hasher};

use dashmap::DashMap;

use super::slot::{Slot, Stamp};
use super::slots::{MapEntry, SlotMap};
use super::table::{Removal, Table};
use super::value::Key;
use super::Eviction;

/// Keys sampled to choose one victim. Redis defaults to 5; 8 tracks exact
/// LRU more closely for little more work.
pub const EVICTION_SAMPLES: usize = 8;

/// Tables with at most this many keys choose their victim exactly.
const EXACT_BELOW: usize = 4 * EVICTION_SAMPLES;

thread_local! {
    /// Per-thread xorshift state; seeded from std's random hasher keys.
    static RNG: Cell<u64> = Cell::new({
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x9e37_79b9_7f4a_7c15);
        h.finish() | 1
    });
}

fn random() -> u64 {
    RNG.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x
    })
}

/// A sampled key: its name, access stamp and age, and whether it had
/// expired.
struct Candidate {
    key: Key,
    stamp: Stamp,
    age: u32,
    expired: bool,
}

impl Candidate {
    fn of(key: &Key, slot: &Slot, now: u64, clock: Stamp) -> Self {
        let stamp = slot.last_access();
        Candidate {
            key: key.clone(),
            stamp,
            age: Slot::age(stamp, clock),
            expired: slot.is_expired(now),
        }
    }

    /// Keeps whichever of `best` and `self` was used less recently.
    fn keep_older(self, best: &mut Option<Candidate>) {
        if best.as_ref().is_none_or(|b| self.older_than(b)) {
            *best = Some(self);
        }
    }

    fn older_than(&self, other: &Candidate) -> bool {
        (self.expired && !other.expired) || (self.expired == other.expired && self.age > other.age)
    }
}

impl Table {
    /// Evicts keys until the table is within `max_entries`, if it evicts.
    /// Must be called without holding any of the table's shard locks.
    pub(crate) fn evict_if_needed(&self) {
        if self.eviction() != Eviction::Lru {
            return;
        }
        let max = self.spec_max_entries().unwrap_or(u64::MAX);
        // Each pass removes a key unless a racing writer used the victim
        // first; the bound only guards against a table that refills as fast
        // as we empty it.
        for _ in 0..1024 {
            if self.size() <= max && !(self.over_memory() && self.size() > 1) {
                return;
            }
            let Some(victim) = self.sample_victim() else {
                return;
            };
            if let MapEntry::Occupied(o) = self.map().entry(victim.key) {
                if o.get().last_access() == victim.stamp {
                    let why = if victim.expired {
                        Removal::Expired
                    } else {
                        Removal::Evicted
                    };
                    self.remove_occupied(o, why);
                }
            }
        }
    }

    /// The least recently used of [`EVICTION_SAMPLES`] random keys, or of
    /// all keys in a small table; `None` only when the table is empty.
    fn sample_victim(&self) -> Option<Candidate> {
        let now = self.now();
        let clock = self.access_stamp();
        let map = self.map();
        if map.len() <= EXACT_BELOW {
            // Sampling a handful of keys can hit the same one every time;
            // scanning them all costs no more.
            let mut best: Option<Candidate> = None;
            for i in 0..map.shard_count() {
                for (key, slot) in map.read(i).iter() {
                    Candidate::of(key, slot, now, clock).keep_older(&mut best);
                }
            }
            return best;
        }
        let mut best: Option<Candidate> = None;
        for _ in 0..EVICTION_SAMPLES {
            sample_slot(map, |key, slot| Candidate::of(key, slot, now, clock))?
                .keep_older(&mut best);
        }
        best
    }
}

/// `pick` applied to one key of `map` chosen at random: from a random
/// shard, the first that holds anything (so sparse maps are sampled as
/// surely as dense ones), a random position of its dense array. `None`
/// only when the map is empty.
fn sample_slot<T>(map: &SlotMap, pick: impl Fn(&Key, &Slot) -> T) -> Option<T> {
    let shards = map.shard_count();
    let first = random() as usize;
    (0..shards).find_map(|i| {
        let shard = map.read(first.wrapping_add(i) % shards);
        let n = shard.len();
        (n > 0)
            .then(|| shard.at(random() as usize % n))
            .flatten()
            .map(|(key, slot)| pick(key, slot))
    })
}

/// `pick` applied to one key of `map` chosen at random: from a random
/// shard, the first that holds anything (so sparse maps are sampled as
/// surely as dense ones), a random occupied bucket. `None` only when the
/// map is empty.
pub(crate) fn sample_one<V, T>(map: &DashMap<Key, V>, pick: impl Fn(&Key, &V) -> T) -> Option<T> {
    let shards = map.shards();
    let first = random() as usize;
    (0..shards.len()).find_map(|i| {
        let guard = shards[first.wrapping_add(i) % shards.len()].read();
        if guard.is_empty() {
            return None;
        }
        let buckets = guard.buckets();
        let start = random() as usize;
        (0..buckets).find_map(|j| {
            // Bucket counts are powers of two.
            let index = start.wrapping_add(j) & (buckets - 1);
            // SAFETY: `index < buckets()`, and the read guard keeps the
            // shard from changing while we look; `pick` copies what it
            // needs out before the guard is released.
            unsafe {
                guard.is_bucket_full(index).then(|| {
                    let (key, shared) = guard.bucket(index).as_ref();
                    pick(key, shared.get())
                })
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::clock::SystemClock;
    use crate::store::{Eviction, Precondition, Store, TableSpec, TableType, Value};

    fn lru_table(max: u64) -> Arc<crate::store::Table> {
        let store = Store::new(Arc::new(SystemClock));
        let mut spec = TableSpec::new("t", TableType::Set, "me");
        spec.settings.max_entries = Some(max);
        spec.settings.eviction = Eviction::Lru;
        store.create_table(spec).unwrap()
    }

    fn put(t: &crate::store::Table, k: &str) {
        t.insert(k, Value::from_canonical(b"1"), None, &Precondition::None)
            .unwrap();
    }

    #[test]
    fn a_one_entry_table_keeps_the_latest_key() {
        let t = lru_table(1);
        for k in ["a", "b", "c"] {
            put(&t, k);
        }
        assert_eq!(t.size(), 1);
        assert!(t.member("c"));
        assert_eq!(
            t.stats.evicted.load(std::sync::atomic::Ordering::Relaxed),
            2
        );
    }

    #[test]
    fn recently_read_keys_outlive_untouched_ones() {
        let t = lru_table(200);
        for i in 0..200 {
            put(&t, &format!("k{i}"));
        }
        for _ in 0..3 {
            for i in 0..100 {
                assert!(t.lookup(&format!("k{i}")).is_some());
            }
        }
        for i in 200..300 {
            put(&t, &format!("k{i}"));
        }
        assert_eq!(t.size(), 200);
        let evicted = t.stats.evicted.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(evicted, 100);
        let hot = (0..100).filter(|i| t.member(&format!("k{i}"))).count();
        let cold = (100..200).filter(|i| t.member(&format!("k{i}"))).count();
        // Exact LRU keeps all 100 hot keys and no cold one; sampling keeps
        // most of the hot set (about 80 on average).
        assert!(hot > cold + 30, "hot {hot}, cold {cold}");
    }
}
