//! What a table keeps under one key, and what reads hand back.

use std::sync::atomic::{AtomicU32, Ordering};

use super::value::Value;

/// One object of a bag key, with the sequence number that orders it among the
/// key's objects and lets a scan cursor resume after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Object {
    /// Store revision at which the object was inserted; unique and increasing.
    pub seq: u64,
    /// The object itself.
    pub value: Value,
}

/// The objects under one key: exactly one for set types, one or more (in
/// insertion order) for bag types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Objects {
    /// `set` and `ordered_set`.
    One(Value),
    /// `bag` and `duplicate_bag`; never empty while stored. Boxed so that
    /// set types, the common case, keep a two-word slot.
    Many(Box<Vec<Object>>),
}

impl Objects {
    /// The objects, borrowed.
    pub fn as_view(&self) -> ObjectsRef<'_> {
        match self {
            Objects::One(v) => ObjectsRef::One(v),
            Objects::Many(objs) => ObjectsRef::Many(objs),
        }
    }

    /// How many objects the key holds.
    pub fn count(&self) -> usize {
        self.as_view().count()
    }

    /// The values in insertion order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        self.as_view().values()
    }
}

/// A key's objects as a slot lends them out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ObjectsRef<'a> {
    /// `set` and `ordered_set`.
    One(&'a Value),
    /// `bag` and `duplicate_bag`, in insertion order.
    Many(&'a [Object]),
}

impl<'a> ObjectsRef<'a> {
    /// How many objects the key holds.
    pub fn count(self) -> usize {
        match self {
            ObjectsRef::One(_) => 1,
            ObjectsRef::Many(objs) => objs.len(),
        }
    }

    /// The values in insertion order.
    pub fn values(self) -> impl Iterator<Item = &'a Value> {
        let (one, many) = match self {
            ObjectsRef::One(v) => (Some(v), None),
            ObjectsRef::Many(objs) => (None, Some(objs.iter().map(|o| &o.value))),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }

    /// An owned copy; values are shared, not copied.
    pub fn to_objects(self) -> Objects {
        match self {
            ObjectsRef::One(v) => Objects::One(v.clone()),
            ObjectsRef::Many(objs) => Objects::Many(Box::new(objs.to_vec())),
        }
    }
}

/// A key's objects as a slot lends them out for a change in place.
#[derive(Debug)]
pub enum ObjectsMut<'a> {
    /// `set` and `ordered_set`.
    One(&'a mut Value),
    /// `bag` and `duplicate_bag`, in insertion order.
    Many(&'a mut Vec<Object>),
}

/// Stamp of a key's last use in an `lru` table: the table's access counter,
/// which wraps at 2^32. Ages are taken modulo 2^32 (see [`Slot::age`]), so
/// a key left unused for more than about two billion uses of its table
/// looks recent to an eviction sample; Redis's LRU clock (24 bits of
/// seconds) makes the same trade for the same reason: a word per key.
pub type Stamp = u32;

/// A slot's objects with the key's access stamp. The stamp sits in the
/// bytes the enum's tag leaves free beside the pointer, so the whole is two
/// words: a separate stamp field would add a word to every map bucket
/// (8 bytes times about two buckets per key).
// A `Vec` is three words; boxed, the bag case fits beside the stamp.
#[allow(clippy::box_collection)]
enum Held {
    One(AtomicU32, Value),
    Many(AtomicU32, Box<Vec<Object>>),
}

impl Held {
    fn new(objects: Objects, stamp: Stamp) -> Self {
        match objects {
            Objects::One(v) => Held::One(AtomicU32::new(stamp), v),
            Objects::Many(objs) => Held::Many(AtomicU32::new(stamp), objs),
        }
    }

    fn stamp(&self) -> &AtomicU32 {
        match self {
            Held::One(s, _) | Held::Many(s, _) => s,
        }
    }
}

/// Everything stored under a key.
pub struct Slot {
    /// The key's objects and the stamp of its last use; only `lru` tables
    /// keep the stamp current. Atomic because reads update it under a
    /// shared lock.
    held: Held,
    /// Store revision of the key's last change: its ETag and CAS token.
    pub version: u64,
    /// Unix milliseconds after which the key is gone; 0 means never.
    pub expires_at: u64,
    /// Unix seconds of the key's last write (`Last-Modified`); 0 when not
    /// known (records written before format 4).
    pub modified: u32,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("objects", &self.objects())
            .field("version", &self.version)
            .field("expires_at", &self.expires_at)
            .field("modified", &self.modified)
            .field("last_access", &self.last_access())
            .finish()
    }
}

impl Clone for Slot {
    fn clone(&self) -> Self {
        Slot::new(
            self.objects().to_objects(),
            self.version,
            self.expires_at,
            self.last_access(),
            self.modified,
        )
    }
}

/// Bytes one map bucket occupies: the `(Key, Slot)` pair and its control byte.
pub const BUCKET_BYTES: usize = std::mem::size_of::<(super::value::Key, Slot)>() + 1;
/// Running estimate of a key's share of its map's bucket array: hash tables
/// run between 44% and 87.5% full, so about 1.5 buckets per key. Table info
/// replaces this estimate with the real bucket count.
pub const BUCKET_ESTIMATE: usize = BUCKET_BYTES * 3 / 2;
/// Bytes a key costs beyond its text: its share of the bucket array. Keys
/// up to 24 bytes live inline; a longer key's heap block is its text plus
/// allocator bookkeeping, counted by [`Slot::footprint`].
pub const KEY_OVERHEAD: usize = BUCKET_ESTIMATE;
/// Longest key stored inline, without a heap block.
pub const INLINE_KEY_BYTES: usize = 24;
/// Bytes an object costs beyond its JSON text: its `Arc` header, allocator
/// bookkeeping, and for bag objects the `Object` record.
pub const OBJECT_OVERHEAD: usize = 32;
/// Bytes a key with a TTL costs in the sweeper's deadline index beyond the
/// key's text: a skip-list node (header, average tower of two links) and the
/// key's copy, with allocator bookkeeping.
pub const DEADLINE_OVERHEAD: usize = 88;
/// Bytes a key costs in an `ordered_set`'s key index beyond its text:
/// a skip-list node and the key's copy, with allocator bookkeeping. Measured
/// by the memory accounting test.
pub const ORDERED_INDEX_OVERHEAD: usize = 72;

impl Slot {
    /// A slot as a write creates it.
    pub fn new(
        objects: Objects,
        version: u64,
        expires_at: u64,
        last_access: Stamp,
        modified: u32,
    ) -> Self {
        Slot {
            held: Held::new(objects, last_access),
            version,
            expires_at,
            modified,
        }
    }

    /// The key's objects.
    pub fn objects(&self) -> ObjectsRef<'_> {
        match &self.held {
            Held::One(_, v) => ObjectsRef::One(v),
            Held::Many(_, objs) => ObjectsRef::Many(objs),
        }
    }

    /// The key's objects, to change in place.
    pub fn objects_mut(&mut self) -> ObjectsMut<'_> {
        match &mut self.held {
            Held::One(_, v) => ObjectsMut::One(v),
            Held::Many(_, objs) => ObjectsMut::Many(objs),
        }
    }

    /// Replaces the key's objects, keeping its stamp.
    pub fn set_objects(&mut self, objects: Objects) {
        self.held = Held::new(objects, self.last_access());
    }

    /// The stamp of the key's last use.
    pub fn last_access(&self) -> Stamp {
        self.held.stamp().load(Ordering::Relaxed)
    }

    /// Stamps a use; a shared borrow is enough.
    pub fn touch(&self, stamp: Stamp) {
        self.held.stamp().store(stamp, Ordering::Relaxed);
    }

    /// Uses of the table since the key's last use, given the table's
    /// current stamp; exact below 2^31 uses. A stamp ahead of `now` (a use
    /// that raced the reading of the clock) or further behind counts as 0.
    pub fn age(stamp: Stamp, now: Stamp) -> u32 {
        let age = now.wrapping_sub(stamp);
        if age > i32::MAX as u32 {
            0
        } else {
            age
        }
    }

    /// Whether the deadline has passed at `now` (Unix ms).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at != 0 && self.expires_at <= now
    }

    /// Estimated heap and table bytes this key occupies.
    pub fn footprint(&self, key_len: usize) -> usize {
        let objects: usize = match self.objects() {
            ObjectsRef::One(v) => v.len() + OBJECT_OVERHEAD,
            ObjectsRef::Many(objs) => objs
                .iter()
                .map(|o| o.value.len() + OBJECT_OVERHEAD + std::mem::size_of::<Object>())
                .sum(),
        };
        let deadline = if self.expires_at != 0 {
            DEADLINE_OVERHEAD + key_len
        } else {
            0
        };
        let key_heap = if key_len > INLINE_KEY_BYTES {
            key_len + 16
        } else {
            0
        };
        KEY_OVERHEAD + key_heap + objects + deadline
    }

    /// The remaining time to live at `now`, if the key has a deadline.
    pub fn ttl_ms(&self, now: u64) -> Option<u64> {
        (self.expires_at != 0).then(|| self.expires_at.saturating_sub(now))
    }
}

/// A key's state as a read saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The objects, shared with the table (cloning values is shallow).
    pub objects: Objects,
    /// The version to send as ETag.
    pub version: u64,
    /// Remaining TTL in milliseconds, when the key has one.
    pub ttl_ms: Option<u64>,
    /// Unix seconds of the key's last write; 0 when not known.
    pub modified: u32,
}

impl Entry {
    pub(crate) fn of(slot: &Slot, now: u64) -> Self {
        Entry {
            objects: slot.objects().to_objects(),
            version: slot.version,
            ttl_ms: slot.ttl_ms(now),
            modified: slot.modified,
        }
    }
}

/// Unix seconds of a Unix-millisecond time, as a slot's `modified` keeps
/// them (u32: good until 2106).
pub fn unix_seconds(ms: u64) -> u32 {
    u32::try_from(ms / 1000).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_five_words() {
        // Every word here costs about two per key in the map's buckets;
        // the fifth holds the write time behind `Last-Modified`.
        assert_eq!(std::mem::size_of::<Slot>(), 40);
    }

    #[test]
    fn ages_survive_the_stamp_wrapping() {
        assert_eq!(Slot::age(5, 9), 4);
        assert_eq!(Slot::age(u32::MAX - 1, 2), 4);
        assert_eq!(
            Slot::age(10, 9),
            0,
            "a stamp just ahead of the clock is recent"
        );
    }
}
