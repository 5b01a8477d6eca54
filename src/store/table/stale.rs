//! Stale copies (RFC 5861's stale-if-error): on a table whose origin sets
//! `stale_if_error_ms`, an entry that expires leaves the table (reads,
//! scans, select and size no longer see it) but its value is kept aside
//! for that long, for a `GET` whose origin fetch fails to answer with.
//!
//! Copies are bounded in number per table (`--max-stale-entries`) and by
//! the server's memory limit, counted as memory of kind `stale`; past
//! either, an expiring entry is simply not kept. A key deleted, evicted or
//! cleared loses its copy: only what expired may come back stale.

use std::collections::HashMap;

use super::*;

/// Stale copies kept by one table, when its origin asks for them.
pub(super) struct StaleCopies {
    /// How long past its expiry a copy is kept, ms.
    window_ms: u64,
    copies: Mutex<HashMap<Key, StaleCopy>>,
    /// The earliest time a copy runs out; `u64::MAX` when none is kept.
    soonest: AtomicU64,
    /// Bytes counted in the server's memory for the copies.
    bytes: AtomicI64,
    memory: Arc<MemoryUse>,
}

struct StaleCopy {
    value: Value,
    version: u64,
    /// Unix seconds of the entry's last write.
    modified: u32,
    /// Unix ms after which the copy is gone.
    until: u64,
    cost: i64,
}

/// Stale copies a table keeps at most unless `--max-stale-entries` says
/// otherwise.
pub const DEFAULT_MAX_STALE: usize = 100_000;

/// Bytes a copy costs beyond its key and value text: the map bucket, the
/// copy record and allocator bookkeeping.
const COPY_OVERHEAD: usize = 96;

impl StaleCopies {
    pub(super) fn new(window_ms: u64, memory: Arc<MemoryUse>) -> Self {
        StaleCopies {
            window_ms,
            copies: Mutex::new(HashMap::new()),
            soonest: AtomicU64::new(u64::MAX),
            bytes: AtomicI64::new(0),
            memory,
        }
    }

    fn copies(&self) -> std::sync::MutexGuard<'_, HashMap<Key, StaleCopy>> {
        self.copies.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn account(&self, delta: i64) {
        self.bytes.fetch_add(delta, Ordering::Relaxed);
        self.memory.add(MemoryKind::Stale, delta);
    }
}

impl Drop for StaleCopies {
    fn drop(&mut self) {
        self.memory
            .add(MemoryKind::Stale, -self.bytes.load(Ordering::Relaxed));
    }
}

impl Table {
    /// Keeps the value of `key`, which just expired, as its stale copy
    /// (set types only; a table without stale copies ignores it).
    pub(super) fn keep_stale(&self, key: &Key, slot: &Slot) {
        let (Some(stale), ObjectsRef::One(value)) = (&self.stale, slot.objects()) else {
            return;
        };
        let until = slot.expires_at.saturating_add(stale.window_ms);
        if until <= self.now() {
            self.forget_stale(key);
            return;
        }
        let cost = (key.len() + value.len() + COPY_OVERHEAD) as i64;
        let mut copies = stale.copies();
        let old = copies.remove(key).map_or(0, |c| c.cost);
        let max = self.shared.max_stale.load(Ordering::Relaxed);
        if copies.len() >= max || !stale.memory.fits(cost.max(0) as u64) {
            drop(copies);
            stale.account(-old);
            return;
        }
        copies.insert(
            key.clone(),
            StaleCopy {
                value: value.clone(),
                version: slot.version,
                modified: slot.modified(),
                until,
                cost,
            },
        );
        stale.soonest.fetch_min(until, Ordering::Relaxed);
        drop(copies);
        stale.account(cost - old);
    }

    /// Drops the stale copy of `key`, if any: it was deleted or evicted, or
    /// its origin answered that it is gone.
    pub fn forget_stale(&self, key: &str) {
        let Some(stale) = &self.stale else {
            return;
        };
        if stale.soonest.load(Ordering::Relaxed) == u64::MAX {
            return;
        }
        if let Some(copy) = stale.copies().remove(key) {
            stale.account(-copy.cost);
        }
    }

    /// Drops every stale copy (a clear).
    pub(super) fn forget_all_stale(&self) {
        let Some(stale) = &self.stale else {
            return;
        };
        let gone: i64 = stale.copies().drain().map(|(_, c)| c.cost).sum();
        stale.soonest.store(u64::MAX, Ordering::Relaxed);
        stale.account(-gone);
    }

    /// The stale copy of `key`, if one is kept and within its window: its
    /// value and version, with no TTL left. An expired entry the sweeper
    /// has not removed yet is its own stale copy.
    pub fn stale_copy(&self, key: &str) -> Option<Entry> {
        let stale = self.stale.as_ref()?;
        let now = self.now();
        if let Some(slot) = self.map.get(key) {
            if !slot.is_expired(now) {
                return None;
            }
            if let ObjectsRef::One(value) = slot.objects() {
                if slot.expires_at.saturating_add(stale.window_ms) > now {
                    return Some(Entry {
                        objects: Objects::One(value.clone()),
                        version: slot.version,
                        ttl_ms: Some(0),
                        modified: slot.modified(),
                    });
                }
            }
        }
        let copies = stale.copies();
        let copy = copies.get(key).filter(|c| c.until > now)?;
        Some(Entry {
            objects: Objects::One(copy.value.clone()),
            version: copy.version,
            ttl_ms: Some(0),
            modified: copy.modified,
        })
    }

    /// Stale copies kept now.
    pub fn stale_entries(&self) -> usize {
        self.stale.as_ref().map_or(0, |s| s.copies().len())
    }

    /// Drops the copies whose window has passed at `now` (the sweeper's
    /// step); a walk only when the soonest of them is due.
    pub(super) fn purge_stale(&self, now: u64) {
        let Some(stale) = &self.stale else {
            return;
        };
        if stale.soonest.load(Ordering::Relaxed) > now {
            return;
        }
        let mut copies = stale.copies();
        let mut gone = 0;
        let mut soonest = u64::MAX;
        copies.retain(|_, c| {
            if c.until <= now {
                gone += c.cost;
                false
            } else {
                soonest = soonest.min(c.until);
                true
            }
        });
        stale.soonest.store(soonest, Ordering::Relaxed);
        drop(copies);
        stale.account(-gone);
    }
}
