//! Idempotency records stored many to one engine item, and the index that
//! finds them.
//!
//! A keyed write to a durable table owes one record, and one engine item
//! per record doubled what a write-back round inserts: measured on a `sync`
//! table, keyed PUTs ran at 0.56-0.65 of plain ones, and without the
//! record's insert at 0.93. So the records that one write-back batch carries
//! are stored as one item, a *bundle*, in that batch (so each still reaches
//! disk with its change or not at all). Bundles are numbered in the order
//! they are written, and their keys sort that way, so each insert lands on
//! the last page of the bundle range, never on a random page of an
//! ever-growing set.
//!
//! A retry finds its record's bundle through [`Locator`], an in-memory map
//! from the record id's hash to its bundle, bounded by
//! `--idempotency-index-entries`. A record that cannot be indexed (the map
//! is full, or its hash is already there) is stored on its own under its
//! id, as before bundles, and found by a direct lookup: the index speeds
//! records up, it is never the only way to one.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use super::PersistError;

/// What every bundle's key in a table's data starts with: a NUL byte, as
/// records, so no entry key can be one.
pub const BUNDLE_KEY_PREFIX: &[u8] = b"\0b/";

/// Bundle layout version (byte 0 of the value).
const BUNDLE_V1: u8 = 1;

/// Bytes of memory an index entry is counted as: the map's key and value,
/// its control byte and the free buckets a hash map keeps.
pub const INDEX_ENTRY_BYTES: usize = 24;

/// The default bound of the index: about 24 MB when full.
pub const DEFAULT_INDEX_ENTRIES: u64 = 1_000_000;

/// The key of bundle `n`: big-endian, so bundles sort in the order written.
pub fn bundle_key(n: u64) -> Vec<u8> {
    [BUNDLE_KEY_PREFIX, &n.to_be_bytes()].concat()
}

/// The number of a bundle's key, if `key` is one.
pub fn bundle_number(key: &[u8]) -> Option<u64> {
    let n = key.strip_prefix(BUNDLE_KEY_PREFIX)?;
    <[u8; 8]>::try_from(n).ok().map(u64::from_be_bytes)
}

/// Encodes records `(id, record)` into a bundle whose last record expires
/// at `expires_at` (Unix ms):
///
/// ```text
/// [0]      1            bundle format
/// [1..9]   expires_at   u64 BE, the latest of its records'
/// repeated { id_len u16 BE, id, record_len u32 BE, record }
/// ```
pub fn encode<'a>(records: impl Iterator<Item = (&'a [u8], &'a [u8])>, expires_at: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(BUNDLE_V1);
    out.extend_from_slice(&expires_at.to_be_bytes());
    for (id, record) in records {
        // Ids are hex digests and records answers within the body limit:
        // both far below these widths.
        let id_len = u16::try_from(id.len()).unwrap_or(u16::MAX);
        let record_len = u32::try_from(record.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&id[..usize::from(id_len)]);
        out.extend_from_slice(&record_len.to_be_bytes());
        out.extend_from_slice(&record[..record_len as usize]);
    }
    out
}

/// A decoded bundle, borrowing from its bytes.
#[derive(Debug)]
pub struct Bundle<'a> {
    /// When its last record expires (Unix ms).
    pub expires_at: u64,
    /// Its records, `(id, record)`, in the order written.
    pub records: Vec<(&'a [u8], &'a [u8])>,
}

impl Bundle<'_> {
    /// The record of `id`, if the bundle holds it.
    pub fn find(&self, id: &[u8]) -> Option<&[u8]> {
        self.records.iter().find(|(i, _)| *i == id).map(|(_, r)| *r)
    }
}

/// Reads a bundle written by [`encode`].
///
/// # Errors
/// [`PersistError::Corrupt`] when the bytes are not one.
pub fn decode(bytes: &[u8]) -> Result<Bundle<'_>, PersistError> {
    let corrupt = |what: &str| PersistError::Corrupt(format!("idempotency bundle: {what}"));
    let (&version, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
    if version != BUNDLE_V1 {
        return Err(corrupt(&format!("unknown format {version}")));
    }
    let (head, mut rest) = rest
        .split_at_checked(8)
        .ok_or_else(|| corrupt("no expiry"))?;
    let expires_at = u64::from_be_bytes(head.try_into().map_err(|_| corrupt("no expiry"))?);
    let mut records = Vec::new();
    while !rest.is_empty() {
        let (len, tail) = rest
            .split_at_checked(2)
            .ok_or_else(|| corrupt("cut id length"))?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let (id, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| corrupt("cut id"))?;
        let (len, tail) = tail
            .split_at_checked(4)
            .ok_or_else(|| corrupt("cut record length"))?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let (record, tail) = tail
            .split_at_checked(len)
            .ok_or_else(|| corrupt("cut record"))?;
        records.push((id, record));
        rest = tail;
    }
    Ok(Bundle {
        expires_at,
        records,
    })
}

/// The index's key for a record id.
fn hash(id: &[u8]) -> u64 {
    // SipHash with fixed keys: the same on every run, and ids are digests
    // the caller cannot aim at one slot.
    let mut h = std::hash::DefaultHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// Which bundle holds each indexed record, per table.
#[derive(Debug)]
pub struct Locator {
    tables: Mutex<HashMap<String, HashMap<u64, u64>>>,
    entries: AtomicUsize,
    max_entries: AtomicUsize,
}

impl Default for Locator {
    fn default() -> Self {
        Locator {
            tables: Mutex::new(HashMap::new()),
            entries: AtomicUsize::new(0),
            max_entries: AtomicUsize::new(
                usize::try_from(DEFAULT_INDEX_ENTRIES).unwrap_or(usize::MAX),
            ),
        }
    }
}

impl Locator {
    /// Sets the bound (`--idempotency-index-entries`); entries past a
    /// lowered bound stay until their bundles expire.
    pub fn set_max_entries(&self, max: usize) {
        self.max_entries.store(max, Ordering::Relaxed);
    }

    /// Entries held, and the bound.
    pub fn stats(&self) -> (usize, usize) {
        (
            self.entries.load(Ordering::Relaxed),
            self.max_entries.load(Ordering::Relaxed),
        )
    }

    /// Indexes `ids` of `table` as held by bundle `n`, as many as the bound
    /// and the hashes already present allow; returns, for each id, whether
    /// it was indexed (one that was not must be stored on its own).
    pub fn insert_all<'a>(
        &self,
        table: &str,
        ids: impl Iterator<Item = &'a [u8]>,
        n: u64,
    ) -> Vec<bool> {
        let max = self.max_entries.load(Ordering::Relaxed);
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let map = match tables.get_mut(table) {
            Some(m) => m,
            None => tables.entry(table.to_owned()).or_default(),
        };
        let mut added = 0;
        let indexed = ids
            .map(|id| {
                if self.entries.load(Ordering::Relaxed) + added >= max {
                    return false;
                }
                match map.entry(hash(id)) {
                    std::collections::hash_map::Entry::Occupied(_) => false,
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(n);
                        added += 1;
                        true
                    }
                }
            })
            .collect();
        self.entries.fetch_add(added, Ordering::Relaxed);
        indexed
    }

    /// Whether the index has room for `count` more records now (their
    /// hashes may still be held: [`Locator::insert_all`] has the last
    /// word).
    pub fn has_room(&self, count: usize) -> bool {
        self.entries.load(Ordering::Relaxed) + count <= self.max_entries.load(Ordering::Relaxed)
    }

    /// The bundle that may hold record `id` of `table`.
    pub fn get(&self, table: &str, id: &[u8]) -> Option<u64> {
        let tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        tables.get(table)?.get(&hash(id)).copied()
    }

    /// Forgets `ids` of `table` where they point at bundle `n` (it was
    /// removed); returns how many it forgot.
    pub fn remove_all<'a>(
        &self,
        table: &str,
        ids: impl Iterator<Item = &'a [u8]>,
        n: u64,
    ) -> usize {
        let mut tables = self.tables.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(map) = tables.get_mut(table) else {
            return 0;
        };
        let mut removed = 0;
        for id in ids {
            let h = hash(id);
            if map.get(&h) == Some(&n) {
                map.remove(&h);
                removed += 1;
            }
        }
        if map.is_empty() {
            tables.remove(table);
        }
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Forgets every entry of a dropped table; returns how many.
    pub fn drop_table(&self, table: &str) -> usize {
        let removed = self
            .tables
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(table)
            .map_or(0, |m| m.len());
        self.entries.fetch_sub(removed, Ordering::Relaxed);
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_reads_back_what_was_written() {
        let records: Vec<(&[u8], &[u8])> = vec![(b"aa", b"{\"x\":1}"), (b"bb", b""), (b"", b"z")];
        let bytes = encode(records.iter().copied(), 77);
        let b = decode(&bytes).expect("decodes");
        assert_eq!(b.expires_at, 77);
        assert_eq!(b.records, records);
        assert_eq!(b.find(b"bb"), Some(&b""[..]));
        assert_eq!(b.find(b"cc"), None);
    }

    #[test]
    fn a_cut_or_unknown_bundle_is_corrupt() {
        let bytes = encode([(&b"aa"[..], &b"rec"[..])].into_iter(), 1);
        for cut in 0..bytes.len() {
            if cut == 9 {
                // The header alone is a bundle of no records.
                continue;
            }
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut other = bytes.clone();
        other[0] = 9;
        assert!(decode(&other).is_err());
    }

    #[test]
    fn bundle_keys_sort_in_the_order_written() {
        let keys: Vec<Vec<u8>> = [1u64, 255, 256, 70_000, u64::MAX - 1]
            .map(bundle_key)
            .into();
        assert!(keys.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(bundle_number(&bundle_key(70_000)), Some(70_000));
        assert_eq!(bundle_number(b"\0i/abc"), None);
    }

    #[test]
    fn the_index_stops_at_its_bound_and_refuses_a_hash_it_holds() {
        let l = Locator::default();
        l.set_max_entries(3);
        let ids: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];
        assert_eq!(l.insert_all("t", ids[..2].iter().copied(), 1), [true, true]);
        // "a" again (its hash is held), then room for one more only.
        assert_eq!(
            l.insert_all("t", [ids[0], ids[2], ids[3]].into_iter(), 2),
            [false, true, false]
        );
        assert_eq!(l.stats(), (3, 3));
        assert_eq!(l.get("t", b"a"), Some(1));
        assert_eq!(l.get("t", b"c"), Some(2));
        assert_eq!(l.get("t", b"d"), None);
        assert_eq!(l.get("u", b"a"), None);
        // Removal names the bundle: a stale removal leaves the entry.
        l.remove_all("t", [ids[0], ids[2]].into_iter(), 2);
        assert_eq!(l.get("t", b"a"), Some(1));
        assert_eq!(l.get("t", b"c"), None);
        assert_eq!(l.stats().0, 2);
        l.drop_table("t");
        assert_eq!(l.stats().0, 0);
        assert!(l.has_room(3));
    }
}
