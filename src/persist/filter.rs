//! A Bloom filter of the idempotency records the durable tier holds.
//!
//! Nearly every keyed write carries a key never seen before, and the only
//! way to be sure of that used to be a lookup in the table's tree, which
//! for a fresh key walks down to a leaf that, once records outnumber the
//! page cache, is read back from disk: most of a keyed write's cost. The
//! filter answers "certainly not stored" from memory for almost all of
//! them. It never answers "not stored" for a record that is: every record
//! enters it before it is queued for disk, and at start-up every stored
//! record enters it before the first request.
//!
//! Its size is fixed (`--idempotency-filter-bytes`), allocated at the first
//! record. Expired records cannot be taken out of a Bloom filter, so the
//! purge builds a fresh one from the records it keeps and swaps it in;
//! records queued meanwhile enter both. Past its capacity the filter only
//! lets more lookups through to disk: it degrades, it does not lie.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

/// Bits set per record.
const PROBES: u64 = 4;

/// The default size, in bytes: about four million records with one
/// lookup in 500 going to disk needlessly.
pub const DEFAULT_FILTER_BYTES: u64 = 8 << 20;

/// The filter, or none before the first record.
#[derive(Debug)]
pub struct RecordFilter {
    bytes: AtomicU64,
    sets: RwLock<Sets>,
    /// Lookups the filter answered alone.
    skipped: AtomicU64,
    /// Lookups it let through that found nothing.
    false_positives: AtomicU64,
}

#[derive(Debug, Default)]
struct Sets {
    current: Option<Arc<Bits>>,
    /// The filter the purge is building, which new records enter too.
    next: Option<Arc<Bits>>,
}

#[derive(Debug)]
struct Bits {
    words: Box<[AtomicU64]>,
    inserted: AtomicU64,
}

impl Bits {
    fn new(bytes: u64) -> Arc<Self> {
        let words = (bytes / 8).max(1) as usize;
        Arc::new(Bits {
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
            inserted: AtomicU64::new(0),
        })
    }

    fn positions(&self, id: &[u8]) -> impl Iterator<Item = (usize, u64)> + '_ {
        let bits = self.words.len() as u64 * 64;
        let (a, b) = hashes(id);
        (0..PROBES).map(move |i| {
            let bit = a.wrapping_add(i.wrapping_mul(b)) % bits;
            ((bit / 64) as usize, 1u64 << (bit % 64))
        })
    }

    fn insert(&self, id: &[u8]) {
        for (word, mask) in self.positions(id) {
            self.words[word].fetch_or(mask, Ordering::Relaxed);
        }
        self.inserted.fetch_add(1, Ordering::Relaxed);
    }

    fn may_hold(&self, id: &[u8]) -> bool {
        self.positions(id)
            .all(|(word, mask)| self.words[word].load(Ordering::Relaxed) & mask != 0)
    }
}

/// Two independent 64-bit hashes of `id` (FNV-1a with two offsets; the
/// ids are already SHA-256 digests, so any mixing will do).
fn hashes(id: &[u8]) -> (u64, u64) {
    let fnv = |seed: u64| {
        id.iter().fold(seed, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    // The step must be odd so the probes do not repeat.
    (fnv(0xcbf2_9ce4_8422_2325), fnv(0x6c62_272e_07bb_0142) | 1)
}

/// A fresh filter being filled by the purge; swapped in by
/// [`Rebuild::finish`], abandoned when dropped.
#[derive(Debug)]
pub struct Rebuild<'a> {
    filter: &'a RecordFilter,
    bits: Arc<Bits>,
    done: bool,
}

impl RecordFilter {
    /// An empty filter of `bytes` bytes, allocated at the first record.
    pub fn new(bytes: u64) -> Self {
        RecordFilter {
            bytes: AtomicU64::new(bytes.max(8)),
            sets: RwLock::new(Sets::default()),
            skipped: AtomicU64::new(0),
            false_positives: AtomicU64::new(0),
        }
    }

    /// Sets the size of filters allocated from now on (at start-up,
    /// before the first record).
    pub fn set_bytes(&self, bytes: u64) {
        self.bytes.store(bytes.max(8), Ordering::Relaxed);
    }

    /// Notes that record `id` is, or is about to be, stored.
    pub fn insert(&self, id: &[u8]) {
        {
            let sets = self.sets.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(current) = &sets.current {
                current.insert(id);
                if let Some(next) = &sets.next {
                    next.insert(id);
                }
                return;
            }
        }
        let mut sets = self.sets.write().unwrap_or_else(PoisonError::into_inner);
        let bytes = self.bytes.load(Ordering::Relaxed);
        let current = sets.current.get_or_insert_with(|| Bits::new(bytes));
        current.insert(id);
        if let Some(next) = &sets.next {
            next.insert(id);
        }
    }

    /// False when record `id` is certainly not stored; true when it may be
    /// (look it up).
    pub fn may_hold(&self, id: &[u8]) -> bool {
        let sets = self.sets.read().unwrap_or_else(PoisonError::into_inner);
        let held = sets.current.as_ref().is_some_and(|c| c.may_hold(id));
        if !held {
            self.skipped.fetch_add(1, Ordering::Relaxed);
        }
        held
    }

    /// Notes that a lookup the filter let through found nothing.
    pub fn false_positive(&self) {
        self.false_positives.fetch_add(1, Ordering::Relaxed);
    }

    /// Starts a fresh filter, which every record inserted from now on
    /// enters too; `None` when no record was ever inserted.
    pub fn rebuild(&self) -> Option<Rebuild<'_>> {
        let mut sets = self.sets.write().unwrap_or_else(PoisonError::into_inner);
        sets.current.as_ref()?;
        let bits = Bits::new(self.bytes.load(Ordering::Relaxed));
        sets.next = Some(bits.clone());
        Some(Rebuild {
            filter: self,
            bits,
            done: false,
        })
    }

    /// Bytes allocated (two filters while one is rebuilt).
    pub fn allocated_bytes(&self) -> u64 {
        let sets = self.sets.read().unwrap_or_else(PoisonError::into_inner);
        let one = |b: &Option<Arc<Bits>>| b.as_ref().map_or(0, |b| b.words.len() as u64 * 8);
        one(&sets.current) + one(&sets.next)
    }

    /// Records in the current filter, lookups it answered alone, and
    /// lookups it let through that found nothing.
    pub fn stats(&self) -> (u64, u64, u64) {
        let sets = self.sets.read().unwrap_or_else(PoisonError::into_inner);
        (
            sets.current
                .as_ref()
                .map_or(0, |c| c.inserted.load(Ordering::Relaxed)),
            self.skipped.load(Ordering::Relaxed),
            self.false_positives.load(Ordering::Relaxed),
        )
    }
}

impl Rebuild<'_> {
    /// Notes a record the purge keeps.
    pub fn keep(&self, id: &[u8]) {
        self.bits.insert(id);
    }

    /// Swaps the fresh filter in.
    pub fn finish(mut self) {
        let mut sets = self
            .filter
            .sets
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        sets.current = sets.next.take();
        self.done = true;
    }
}

impl Drop for Rebuild<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.filter
                .sets
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .next = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> Vec<u8> {
        format!("{n:064x}").into_bytes()
    }

    #[test]
    fn an_inserted_record_is_always_maybe_and_most_others_are_not() {
        let f = RecordFilter::new(64 << 10);
        assert!(!f.may_hold(&id(1)), "an empty filter holds nothing");
        for n in 0..20_000 {
            f.insert(&id(n));
        }
        assert!((0..20_000).all(|n| f.may_hold(&id(n))));
        let false_positives = (1_000_000..1_100_000)
            .filter(|n| f.may_hold(&id(*n)))
            .count();
        // 524,288 bits, 20,000 records, 4 probes: about 0.2%.
        assert!(false_positives < 1_000, "{false_positives} in 100,000");
    }

    #[test]
    fn a_rebuild_keeps_what_it_is_told_and_what_arrives_meanwhile() {
        let f = RecordFilter::new(64 << 10);
        assert!(f.rebuild().is_none(), "nothing to rebuild");
        for n in 0..100 {
            f.insert(&id(n));
        }
        let rebuild = f.rebuild().expect("a filter to rebuild");
        for n in 0..50 {
            rebuild.keep(&id(n));
        }
        f.insert(&id(500));
        assert!(f.may_hold(&id(70)), "the old filter answers until the swap");
        rebuild.finish();
        assert!((0..50).all(|n| f.may_hold(&id(n))));
        assert!(f.may_hold(&id(500)), "inserted during the rebuild");
        let forgotten = (50..100).filter(|n| f.may_hold(&id(*n))).count();
        assert!(forgotten < 5, "{forgotten} of 50 purged records remain");
        assert_eq!(f.allocated_bytes(), 64 << 10);
    }

    #[test]
    fn an_abandoned_rebuild_leaves_the_filter_as_it_was() {
        let f = RecordFilter::new(1 << 10);
        f.insert(&id(7));
        drop(f.rebuild());
        assert!(f.may_hold(&id(7)));
        assert_eq!(f.allocated_bytes(), 1 << 10);
    }
}
