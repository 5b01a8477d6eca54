//! What a table keeps under one key, and what reads hand back.

use std::ffi::c_void;
use std::ptr::NonNull;
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

/// Low bit of [`Held::ptr`]: set when it points to a bag's objects.
const MANY: usize = 1;

/// A key's objects with its access stamp and write time, in two words:
/// every byte of a slot is paid once per key in the table's dense array.
/// The objects are one pointer: a set type's [`Value`] as
/// [`Value::into_ptr`] gives it, or a bag's `Box<Vec<Object>>` with the
/// low bit set (both allocations are 8-aligned, so the bit is free).
struct Held {
    /// Atomic because reads update it under a shared lock; only `lru`
    /// tables keep it current.
    stamp: AtomicU32,
    /// Unix seconds of the key's last write (`Last-Modified`); 0 when not
    /// known (records written before format 4).
    modified: u32,
    ptr: NonNull<c_void>,
}

// SAFETY: a Held owns a Value or a Box<Vec<Object>>, both Send and Sync;
// shared borrows only read through the pointer, and only `&mut self`
// methods change what it points to.
unsafe impl Send for Held {}
// SAFETY: as for Send.
unsafe impl Sync for Held {}

impl Held {
    fn new(objects: Objects, stamp: Stamp, modified: u32) -> Self {
        let ptr = match objects {
            Objects::One(v) => v.into_ptr(),
            Objects::Many(objs) => NonNull::from(Box::leak(objs))
                .cast::<c_void>()
                .map_addr(|a| a | MANY),
        };
        Held {
            stamp: AtomicU32::new(stamp),
            modified,
            ptr,
        }
    }

    fn many(&self) -> Option<*mut Vec<Object>> {
        let raw = self.ptr.as_ptr();
        (raw.addr() & MANY != 0).then(|| raw.map_addr(|a| a & !MANY).cast())
    }

    fn objects(&self) -> ObjectsRef<'_> {
        match self.many() {
            // SAFETY: with the bit set, the pointer is a leaked Box that
            // this Held owns until it drops.
            Some(objs) => ObjectsRef::Many(unsafe { &*objs }),
            // SAFETY: without it, the pointer is from Value::into_ptr and
            // is taken back only by Drop.
            None => ObjectsRef::One(unsafe { Value::borrow_ptr(&self.ptr) }),
        }
    }

    fn objects_mut(&mut self) -> ObjectsMut<'_> {
        match self.many() {
            // SAFETY: as in `objects`, and `&mut self` makes it exclusive.
            Some(objs) => ObjectsMut::Many(unsafe { &mut *objs }),
            // SAFETY: as in `objects`; a value assigned through the borrow
            // leaves its own pointer (bit clear) in `ptr`.
            None => ObjectsMut::One(unsafe { Value::borrow_ptr_mut(&mut self.ptr) }),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        match self.many() {
            // SAFETY: the Box leaked in `new`, taken back once, here.
            Some(objs) => drop(unsafe { Box::from_raw(objs) }),
            // SAFETY: the pointer from Value::into_ptr, taken back once.
            None => drop(unsafe { Value::from_ptr(self.ptr) }),
        }
    }
}

/// Everything stored under a key.
pub struct Slot {
    /// The key's objects, the stamp of its last use and its write time.
    held: Held,
    /// Store revision of the key's last change: its ETag and CAS token.
    pub version: u64,
    /// Unix milliseconds after which the key is gone; 0 means never.
    pub expires_at: u64,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("objects", &self.objects())
            .field("version", &self.version)
            .field("expires_at", &self.expires_at)
            .field("modified", &self.modified())
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
            self.modified(),
        )
    }
}

/// Running estimate of the map's bytes per key: its pair in the dense
/// array (which grows in doublings, so on average about a quarter more
/// room than pairs) and about one and a half index buckets (the index runs
/// between 44% and 87.5% full). Table info replaces this estimate with
/// what the arrays really hold. Keys up to 24 bytes live inline; a longer
/// key's heap block is its text plus allocator bookkeeping, counted by
/// [`Slot::footprint`].
pub const KEY_OVERHEAD: usize =
    super::slots::PAIR_BYTES * 5 / 4 + super::slots::INDEX_BUCKET_BYTES * 3 / 2;
/// Longest key stored inline, without a heap block.
pub const INLINE_KEY_BYTES: usize = 24;
/// Heap bytes of an object whose JSON text is `len` bytes: its block
/// holds a reference count and the length (16 bytes) before the text, and
/// the allocator adds an 8-byte header and rounds blocks to 16 bytes. A
/// bag object also takes an [`Object`] record in its key's vector.
pub fn object_bytes(len: usize) -> usize {
    (len + 16 + 8).next_multiple_of(16)
}
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
            held: Held::new(objects, last_access, modified),
            version,
            expires_at,
        }
    }

    /// The key's objects.
    pub fn objects(&self) -> ObjectsRef<'_> {
        self.held.objects()
    }

    /// The key's objects, to change in place.
    pub fn objects_mut(&mut self) -> ObjectsMut<'_> {
        self.held.objects_mut()
    }

    /// Replaces the key's objects, keeping its stamp and write time.
    pub fn set_objects(&mut self, objects: Objects) {
        self.held = Held::new(objects, self.last_access(), self.modified());
    }

    /// Unix seconds of the key's last write (`Last-Modified`); 0 when not
    /// known (records written before format 4).
    pub fn modified(&self) -> u32 {
        self.held.modified
    }

    /// Sets the key's write time, Unix seconds.
    pub fn set_modified(&mut self, seconds: u32) {
        self.held.modified = seconds;
    }

    /// The stamp of the key's last use.
    pub fn last_access(&self) -> Stamp {
        self.held.stamp.load(Ordering::Relaxed)
    }

    /// Stamps a use; a shared borrow is enough.
    pub fn touch(&self, stamp: Stamp) {
        self.held.stamp.store(stamp, Ordering::Relaxed);
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
            ObjectsRef::One(v) => object_bytes(v.len()),
            ObjectsRef::Many(objs) => objs
                .iter()
                .map(|o| object_bytes(o.value.len()) + std::mem::size_of::<Object>())
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
            modified: slot.modified(),
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
    fn a_slot_is_four_words() {
        // Every word here is paid once per key in the table's dense array.
        assert_eq!(std::mem::size_of::<Slot>(), 32);
    }

    #[test]
    fn a_slot_keeps_a_value_or_a_bag() {
        let v = Value::from_canonical(b"1");
        let mut one = Slot::new(Objects::One(v.clone()), 1, 0, 7, 9);
        assert_eq!(one.objects(), ObjectsRef::One(&v));
        if let ObjectsMut::One(held) = one.objects_mut() {
            *held = Value::from_canonical(b"2");
        }
        assert_eq!(
            one.clone().objects().values().next().map(Value::as_bytes),
            Some(&b"2"[..])
        );
        let objs = vec![
            Object {
                seq: 3,
                value: v.clone(),
            },
            Object { seq: 4, value: v },
        ];
        let mut bag = Slot::new(Objects::Many(Box::new(objs.clone())), 2, 0, 7, 9);
        assert_eq!(bag.objects(), ObjectsRef::Many(&objs));
        if let ObjectsMut::Many(held) = bag.objects_mut() {
            held.pop();
        }
        assert_eq!(bag.objects().count(), 1);
        bag.set_objects(Objects::One(Value::from_canonical(b"3")));
        assert_eq!((bag.last_access(), bag.modified()), (7, 9));
        assert_eq!(bag.objects().count(), 1);
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
