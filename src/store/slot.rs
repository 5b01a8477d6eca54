//! What a table keeps under one key, and what reads hand back.

use std::sync::atomic::{AtomicU64, Ordering};

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
    /// How many objects the key holds.
    pub fn count(&self) -> usize {
        match self {
            Objects::One(_) => 1,
            Objects::Many(v) => v.len(),
        }
    }

    /// The values in insertion order.
    pub fn values(&self) -> impl Iterator<Item = &Value> {
        let (one, many) = match self {
            Objects::One(v) => (Some(v), None),
            Objects::Many(objs) => (None, Some(objs.iter().map(|o| &o.value))),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

/// Everything stored under a key.
#[derive(Debug)]
pub struct Slot {
    /// The key's objects.
    pub objects: Objects,
    /// Store revision of the key's last change: its ETag and CAS token.
    pub version: u64,
    /// Unix milliseconds after which the key is gone; 0 means never.
    pub expires_at: u64,
    /// The table's access tick at the key's last use; only `lru` tables keep
    /// it current. Atomic because reads update it under a shared lock.
    pub last_access: AtomicU64,
}

impl Clone for Slot {
    fn clone(&self) -> Self {
        Slot {
            objects: self.objects.clone(),
            version: self.version,
            expires_at: self.expires_at,
            last_access: AtomicU64::new(self.last_access.load(Ordering::Relaxed)),
        }
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
    pub fn new(objects: Objects, version: u64, expires_at: u64, last_access: u64) -> Self {
        Slot {
            objects,
            version,
            expires_at,
            last_access: AtomicU64::new(last_access),
        }
    }

    /// The access tick of the key's last use.
    pub fn last_access(&self) -> u64 {
        self.last_access.load(Ordering::Relaxed)
    }

    /// Whether the deadline has passed at `now` (Unix ms).
    pub fn is_expired(&self, now: u64) -> bool {
        self.expires_at != 0 && self.expires_at <= now
    }

    /// Estimated heap and table bytes this key occupies.
    pub fn footprint(&self, key_len: usize) -> usize {
        let objects: usize = match &self.objects {
            Objects::One(v) => v.len() + OBJECT_OVERHEAD,
            Objects::Many(objs) => objs
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
}

impl Entry {
    pub(crate) fn of(slot: &Slot, now: u64) -> Self {
        Entry {
            objects: slot.objects.clone(),
            version: slot.version,
            ttl_ms: slot.ttl_ms(now),
        }
    }
}
