//! The map a table keeps its keys in: shards of a dense array of
//! `(key, slot)` pairs, found through a hash index of positions.
//!
//! # Why not a general hash map
//! A hash table with the pairs in its buckets pays for every empty bucket
//! as much as for a full one, and power-of-two tables run between 44% and
//! 87.5% full: at a million keys that was 136 bytes per key of buckets for
//! a 64-byte pair. Here the index's buckets hold a 4-byte position, and
//! the pairs sit packed in a vector, so an empty bucket costs 5 bytes.
//! Removing a key moves the shard's last pair into its place (one index
//! entry changes), so the array never has holes.
//!
//! # Locking
//! Each shard is behind its own lock; an entry or a read guard holds it for
//! as long as it lives. The shard of a key comes from bits of its hash that
//! the index does not use for its control bytes (the top 7), so keys of one
//! shard still spread over the index's tags.

use std::hash::BuildHasher;
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;

use super::slot::Slot;
use super::value::Key;

/// Hasher of a table's keys: SipHash with per-table random keys, so that
/// clients cannot aim keys at one bucket.
pub type KeyHasher = std::collections::hash_map::RandomState;

/// Bytes one index bucket costs: a 4-byte position and its control byte.
pub const INDEX_BUCKET_BYTES: usize = std::mem::size_of::<u32>() + 1;
/// Bytes one pair costs in the dense array.
pub const PAIR_BYTES: usize = std::mem::size_of::<(Key, Slot)>();

/// One shard: the pairs, packed, and the index from hash to position.
/// Positions are `u32`: a shard would need 4 billion keys (hundreds of
/// gigabytes) to outgrow them.
pub struct Shard {
    index: HashTable<u32>,
    pairs: Vec<(Key, Slot)>,
    hasher: KeyHasher,
}

impl Shard {
    fn with_hasher(hasher: KeyHasher) -> Self {
        Shard {
            index: HashTable::new(),
            pairs: Vec::new(),
            hasher,
        }
    }

    /// Keys stored.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether the shard holds no key.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// The pairs, in no particular order (removals reorder them).
    pub fn iter(&self) -> std::slice::Iter<'_, (Key, Slot)> {
        self.pairs.iter()
    }

    /// The pair at `position` (below [`Shard::len`]), for sampling.
    pub fn at(&self, position: usize) -> Option<&(Key, Slot)> {
        self.pairs.get(position)
    }

    /// Position of `key`, whose hash is `hash`.
    pub fn find(&self, hash: u64, key: &str) -> Option<usize> {
        let pairs = &self.pairs;
        self.index
            .find(hash, |&i| pairs[i as usize].0 == key)
            .map(|&i| i as usize)
    }

    /// The slot of `key`, whose hash is `hash`.
    pub fn get(&self, hash: u64, key: &str) -> Option<&Slot> {
        self.find(hash, key).map(|i| &self.pairs[i].1)
    }

    /// Stores a key known to be absent; returns its position.
    pub fn insert_new(&mut self, hash: u64, key: Key, slot: Slot) -> usize {
        let position = self.pairs.len();
        self.pairs.push((key, slot));
        let (pairs, hasher) = (&self.pairs, &self.hasher);
        self.index.insert_unique(hash, position as u32, |&i| {
            hasher.hash_one(pairs[i as usize].0.as_str())
        });
        position
    }

    /// Removes the pair at `position`, whose key hashes to `hash`, moving
    /// the last pair into its place.
    pub fn remove_at(&mut self, hash: u64, position: usize) -> (Key, Slot) {
        if let Ok(found) = self.index.find_entry(hash, |&i| i as usize == position) {
            found.remove();
        }
        let removed = self.pairs.swap_remove(position);
        if let Some((moved, _)) = self.pairs.get(position) {
            let old = self.pairs.len() as u32;
            let moved_hash = self.hasher.hash_one(moved.as_str());
            if let Some(i) = self.index.find_mut(moved_hash, |&i| i == old) {
                *i = position as u32;
            }
        }
        self.give_back();
        removed
    }

    /// Removes `key` if present.
    pub fn remove(&mut self, hash: u64, key: &str) -> Option<(Key, Slot)> {
        let position = self.find(hash, key)?;
        Some(self.remove_at(hash, position))
    }

    /// Hands the shard's contents out, leaving it empty and without
    /// allocations.
    pub fn take(&mut self) -> Vec<(Key, Slot)> {
        self.index = HashTable::new();
        std::mem::take(&mut self.pairs)
    }

    /// Bytes the shard's arrays occupy, empty room included.
    pub fn bytes(&self) -> usize {
        // An index that never held anything has no allocation (it reports
        // one bucket, of a shared empty group).
        let index = match self.index.capacity() {
            0 => 0,
            // Control bytes: one per bucket and a trailing group of 16.
            _ => self.index.num_buckets() * INDEX_BUCKET_BYTES + 16,
        };
        index + self.pairs.capacity() * PAIR_BYTES
    }

    /// After a removal: once the shard is at a quarter of what its arrays
    /// hold, shrinks them to twice its size, so a table that grew and then
    /// emptied gives its room back (a hash map keeps it until dropped).
    fn give_back(&mut self) {
        const SMALLEST: usize = 64;
        let len = self.pairs.len();
        if self.pairs.capacity() > SMALLEST && len * 4 < self.pairs.capacity() {
            self.pairs.shrink_to(SMALLEST.max(len * 2));
            let (pairs, hasher) = (&self.pairs, &self.hasher);
            self.index.shrink_to(SMALLEST.max(len * 2), |&i| {
                hasher.hash_one(pairs[i as usize].0.as_str())
            });
        }
    }
}

/// A table's keys and slots, in [`SHARD_COUNT`] shards.
pub struct SlotMap {
    shards: Box<[RwLock<Shard>]>,
    hasher: KeyHasher,
}

/// Shards per map. A cursor scan over a hashed table reads one shard per
/// page, so more shards keep pages cheap on big tables; an empty shard
/// holds no allocation.
pub const SHARD_COUNT: usize = 64;

impl Default for SlotMap {
    fn default() -> Self {
        let hasher = KeyHasher::new();
        SlotMap {
            shards: (0..SHARD_COUNT)
                .map(|_| RwLock::new(Shard::with_hasher(hasher.clone())))
                .collect(),
            hasher,
        }
    }
}

impl SlotMap {
    /// The hash of `key`, as the index and [`SlotMap::shard_of`] use it.
    pub fn hash(&self, key: &str) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The shard a hash falls in: the bits just below the top 7, which
    /// the index keeps for its control bytes.
    pub fn shard_of(&self, hash: u64) -> usize {
        ((hash << 7) >> (64 - SHARD_COUNT.trailing_zeros())) as usize
    }

    /// The smallest hash that falls in `shard`.
    pub fn shard_start(&self, shard: usize) -> u64 {
        ((shard as u64) << (64 - SHARD_COUNT.trailing_zeros())) >> 7
    }

    /// How many shards there are.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Shard `i`, read-locked.
    pub fn read(&self, i: usize) -> RwLockReadGuard<'_, Shard> {
        self.shards[i]
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Shard `i`, write-locked.
    pub fn write(&self, i: usize) -> RwLockWriteGuard<'_, Shard> {
        self.shards[i]
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Every shard write-locked, in order (the only order in which more
    /// than one is ever taken).
    pub fn write_all(&self) -> Vec<RwLockWriteGuard<'_, Shard>> {
        (0..self.shards.len()).map(|i| self.write(i)).collect()
    }

    /// The slot of `key` with its shard read-locked.
    pub fn get(&self, key: &str) -> Option<SlotRef<'_>> {
        let hash = self.hash(key);
        let shard = self.read(self.shard_of(hash));
        let position = shard.find(hash, key)?;
        Some(SlotRef { shard, position })
    }

    /// The entry of `key`, its shard write-locked until the entry is dropped.
    pub fn entry(&self, key: Key) -> MapEntry<'_> {
        let hash = self.hash(&key);
        let shard = self.write(self.shard_of(hash));
        match shard.find(hash, &key) {
            Some(position) => MapEntry::Occupied(OccupiedEntry {
                shard,
                position,
                hash,
            }),
            None => MapEntry::Vacant(VacantEntry { shard, key, hash }),
        }
    }

    /// Keys stored, summed over the shards (each read-locked in turn).
    pub fn len(&self) -> usize {
        (0..self.shards.len()).map(|i| self.read(i).len()).sum()
    }

    /// Bytes the shards' arrays occupy, empty room included.
    pub fn bytes(&self) -> usize {
        (0..self.shards.len()).map(|i| self.read(i).bytes()).sum()
    }
}

/// A stored slot, its shard read-locked while this lives.
pub struct SlotRef<'a> {
    shard: RwLockReadGuard<'a, Shard>,
    position: usize,
}

impl std::ops::Deref for SlotRef<'_> {
    type Target = Slot;

    fn deref(&self) -> &Slot {
        &self.shard.pairs[self.position].1
    }
}

/// A key's place in the map, its shard write-locked while this lives.
pub enum MapEntry<'a> {
    /// The key is stored.
    Occupied(OccupiedEntry<'a>),
    /// The key is not stored.
    Vacant(VacantEntry<'a>),
}

/// A stored key, its shard write-locked.
pub struct OccupiedEntry<'a> {
    shard: RwLockWriteGuard<'a, Shard>,
    position: usize,
    hash: u64,
}

impl OccupiedEntry<'_> {
    /// The key.
    pub fn key(&self) -> &Key {
        &self.shard.pairs[self.position].0
    }

    /// The slot.
    pub fn get(&self) -> &Slot {
        &self.shard.pairs[self.position].1
    }

    /// The slot, to change in place.
    pub fn get_mut(&mut self) -> &mut Slot {
        &mut self.shard.pairs[self.position].1
    }

    /// Replaces the slot, returning the old one.
    pub fn insert(&mut self, slot: Slot) -> Slot {
        std::mem::replace(self.get_mut(), slot)
    }

    /// Removes the key, returning it with its slot.
    pub fn remove_entry(mut self) -> (Key, Slot) {
        self.shard.remove_at(self.hash, self.position)
    }
}

/// An absent key, its shard write-locked.
pub struct VacantEntry<'a> {
    shard: RwLockWriteGuard<'a, Shard>,
    key: Key,
    hash: u64,
}

impl<'a> VacantEntry<'a> {
    /// The key.
    pub fn key(&self) -> &Key {
        &self.key
    }

    /// Stores the key with `slot`; the entry it becomes keeps the lock.
    pub fn insert(mut self, slot: Slot) -> OccupiedEntry<'a> {
        let position = self.shard.insert_new(self.hash, self.key, slot);
        OccupiedEntry {
            shard: self.shard,
            position,
            hash: self.hash,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::slot::Objects;
    use crate::store::value::Value;

    fn slot(n: u64) -> Slot {
        Slot::new(
            Objects::One(Value::from_canonical(n.to_string().as_bytes())),
            n,
            0,
            0,
            0,
        )
    }

    fn put(map: &SlotMap, key: &str, n: u64) {
        match map.entry(Key::from(key)) {
            MapEntry::Occupied(mut o) => {
                o.insert(slot(n));
            }
            MapEntry::Vacant(v) => {
                v.insert(slot(n));
            }
        }
    }

    fn delete(map: &SlotMap, key: &str) -> bool {
        match map.entry(Key::from(key)) {
            MapEntry::Occupied(o) => {
                o.remove_entry();
                true
            }
            MapEntry::Vacant(_) => false,
        }
    }

    #[test]
    fn behaves_as_a_map_through_growth_removal_and_shrinking() {
        let map = SlotMap::default();
        let mut model = std::collections::HashMap::new();
        // Grow past several doublings, remove most (so shards shrink and
        // pairs move), then write again over what is left.
        for i in 0..20_000u64 {
            put(&map, &format!("k{i}"), i);
            model.insert(format!("k{i}"), i);
        }
        for i in (0..20_000u64).filter(|i| i % 7 != 0) {
            assert!(delete(&map, &format!("k{i}")));
            model.remove(&format!("k{i}"));
        }
        assert!(!delete(&map, "k1"));
        for i in (0..20_000u64).step_by(3) {
            put(&map, &format!("k{i}"), i + 1);
            model.insert(format!("k{i}"), i + 1);
        }
        assert_eq!(map.len(), model.len());
        for (k, v) in &model {
            let found = map.get(k).unwrap_or_else(|| panic!("{k} lost"));
            assert_eq!(found.version, *v);
        }
        let mut seen = 0;
        for i in 0..map.shard_count() {
            let shard = map.read(i);
            for (k, s) in shard.iter() {
                assert_eq!(model.get(k.as_str()), Some(&s.version));
                assert_eq!(map.shard_of(map.hash(k)), i, "{k} in the wrong shard");
                seen += 1;
            }
        }
        assert_eq!(seen, model.len());
    }

    #[test]
    fn an_emptied_map_gives_its_room_back() {
        let map = SlotMap::default();
        for i in 0..50_000 {
            put(&map, &format!("k{i}"), i);
        }
        let full = map.bytes();
        for i in 0..50_000 {
            delete(&map, &format!("k{i}"));
        }
        assert_eq!(map.len(), 0);
        assert!(map.bytes() * 10 < full, "{} of {full}", map.bytes());
        assert_eq!(SlotMap::default().bytes(), 0, "an unused map holds nothing");
    }

    #[test]
    fn shard_start_is_the_first_hash_of_its_shard() {
        let map = SlotMap::default();
        for shard in 0..map.shard_count() {
            let start = map.shard_start(shard);
            assert_eq!(map.shard_of(start), shard);
            if start > 0 {
                assert_eq!(map.shard_of(start - 1), shard - 1);
            }
        }
    }
}
