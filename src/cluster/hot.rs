//! A node's hot copy of one cluster table: recently used rows, kept
//! coherent with PostgreSQL.
//!
//! # Coherence
//! Every row carries its version, and versions of one key grow in commit
//! order (a writer takes its version while holding the key's row lock), so
//! "newer wins" makes the order in which news arrives irrelevant. News comes
//! from three places:
//! - this node's own writes, after commit (so the node reads its writes);
//! - reads from PostgreSQL that missed the hot copy;
//! - the change log, which says only "key k changed at version v": the copy
//!   drops k if it holds an older version.
//!
//! A read from PostgreSQL may return a row that a change applied from the
//! log during the round trip has already superseded. To never install such
//! a row, each key hashes to one of [`GENERATIONS`] counters that the log
//! bumps (under the key's map lock) before it drops the key; an install
//! takes the counter before the round trip and goes ahead only if it is
//! unchanged. A change to the whole table (clear, drop) bumps a table-wide
//! counter the same way.
//!
//! # Size
//! All hot copies of a node share one byte budget. Past it, an install
//! evicts the least recently used of a few sampled rows of its table, as
//! the local tables' LRU does.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;

use super::rows::Row;
use crate::store::{sample_one, Entry, Key, Objects};

/// Generation counters per table; more means fewer installs skipped
/// because an unrelated key of the same slot changed.
pub const GENERATIONS: usize = 1024;

/// Rows sampled to pick an eviction victim.
const SAMPLES: usize = 8;

/// Bytes a row costs beyond its key and JSON text (map slot, versions).
const ROW_OVERHEAD: usize = 96;

/// The byte budget all hot copies of a node share.
#[derive(Debug)]
pub struct Budget {
    /// Bytes held now.
    pub used: AtomicI64,
    /// Most bytes to hold.
    pub cap: u64,
    /// Ticks once per use, to order rows by recency.
    clock: AtomicU64,
}

impl Budget {
    /// A budget of `cap` bytes.
    pub fn new(cap: u64) -> Self {
        Budget {
            used: AtomicI64::new(0),
            cap,
            clock: AtomicU64::new(0),
        }
    }

    fn over(&self) -> bool {
        self.used.load(Ordering::Relaxed) > self.cap as i64
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }
}

#[derive(Debug)]
struct HotRow {
    row: Row,
    bytes: usize,
    used: AtomicU64,
}

/// Where the generation counters stood before a round trip; an install
/// with it succeeds only if they have not moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    slot: usize,
    key_gen: u64,
    table_gen: u64,
}

/// The hot copy of one table.
#[derive(Debug)]
pub struct HotCopy {
    map: DashMap<Key, HotRow>,
    gens: Box<[AtomicU64]>,
    table_gen: AtomicU64,
    /// Bytes this copy holds.
    bytes: AtomicI64,
    /// Held shared (each thread its own stripe) by a read, exclusively
    /// while this node learns the keys of one committed transaction, so
    /// that no read of this node sees part of it.
    step: crate::stripe::Striped<std::sync::RwLock<()>>,
}

impl Default for HotCopy {
    fn default() -> Self {
        HotCopy {
            map: DashMap::new(),
            gens: (0..GENERATIONS).map(|_| AtomicU64::new(0)).collect(),
            table_gen: AtomicU64::new(0),
            bytes: AtomicI64::new(0),
            step: Default::default(),
        }
    }
}

impl HotCopy {
    fn slot(&self, key: &str) -> usize {
        let mut h = self.map.hasher().build_hasher();
        h.write(key.as_bytes());
        (h.finish() as usize) % GENERATIONS
    }

    /// Bytes this copy holds.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed).max(0) as u64
    }

    /// The live row of `key`, if held.
    pub fn get(&self, key: &str, now: u64, budget: &Budget) -> Option<Entry> {
        let _step = self
            .step
            .mine()
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let hot = self.map.get(key)?;
        if hot.row.is_expired(now) {
            return None;
        }
        hot.used.store(budget.tick(), Ordering::Relaxed);
        Some(hot.row.entry(now))
    }

    /// Every stripe of the step lock: while held, no read of this copy
    /// runs, so what is learned under it is seen all at once.
    pub fn exclusive(&self) -> Vec<std::sync::RwLockWriteGuard<'_, ()>> {
        self.step
            .all()
            .map(|s| s.write().unwrap_or_else(std::sync::PoisonError::into_inner))
            .collect()
    }

    /// Takes a ticket before reading `key` from PostgreSQL.
    pub fn ticket(&self, key: &str) -> Ticket {
        let slot = self.slot(key);
        Ticket {
            slot,
            key_gen: self.gens[slot].load(Ordering::Acquire),
            table_gen: self.table_gen.load(Ordering::Acquire),
        }
    }

    /// Records what PostgreSQL said of `key` at `version`: `Some(row)` if
    /// the key holds it, `None` if the key was removed at `version`. A row
    /// is installed only if nothing about the key changed since `ticket`;
    /// an older copy is dropped either way.
    pub fn learn(
        &self,
        key: &str,
        version: u64,
        row: Option<Row>,
        ticket: Ticket,
        budget: &Budget,
    ) {
        // The generation check and the install happen under the key's map
        // lock, which `changed` also holds while it bumps the generation.
        let added = match self.map.entry(Key::from(key)) {
            MapEntry::Occupied(mut o) => {
                if o.get().row.version >= version {
                    return;
                }
                match row.filter(|_| self.still(ticket)) {
                    Some(row) => {
                        let hot = hot_row(key, row, budget);
                        let delta = hot.bytes as i64 - o.get().bytes as i64;
                        o.insert(hot);
                        delta
                    }
                    None => -(o.remove_entry().1.bytes as i64),
                }
            }
            MapEntry::Vacant(v) => match row.filter(|_| self.still(ticket)) {
                Some(row) => {
                    let hot = hot_row(key, row, budget);
                    let bytes = hot.bytes as i64;
                    v.insert(hot);
                    bytes
                }
                None => 0,
            },
        };
        self.account(added, budget);
        if added > 0 {
            self.evict(budget);
        }
    }

    fn still(&self, ticket: Ticket) -> bool {
        self.gens[ticket.slot].load(Ordering::Acquire) == ticket.key_gen
            && self.table_gen.load(Ordering::Acquire) == ticket.table_gen
    }

    /// Applies a change from the log: `key` changed at `version`.
    pub fn changed(&self, key: &str, version: u64, budget: &Budget) {
        // The entry holds the key's map lock, present or not, so the bump
        // is ordered with any install of the key (see `learn`).
        let entry = self.map.entry(Key::from(key));
        self.gens[self.slot(key)].fetch_add(1, Ordering::AcqRel);
        if let MapEntry::Occupied(o) = entry {
            if o.get().row.version < version {
                let (_, old) = o.remove_entry();
                self.account(-(old.bytes as i64), budget);
            }
        }
    }

    /// Drops every row (the table was emptied or dropped, or this node lost
    /// track of the log).
    pub fn clear(&self, budget: &Budget) {
        self.table_gen.fetch_add(1, Ordering::AcqRel);
        let mut freed = 0i64;
        self.map.retain(|_, hot| {
            freed += hot.bytes as i64;
            false
        });
        self.account(-freed, budget);
    }

    fn account(&self, delta: i64, budget: &Budget) {
        if delta != 0 {
            self.bytes.fetch_add(delta, Ordering::Relaxed);
            budget.used.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Evicts sampled least recently used rows while the budget is over.
    fn evict(&self, budget: &Budget) {
        for _ in 0..64 {
            if !budget.over() {
                return;
            }
            let mut victim: Option<(Key, u64)> = None;
            for _ in 0..SAMPLES {
                let Some((key, used)) = sample_one(&self.map, |k, h| {
                    (k.clone(), h.used.load(Ordering::Relaxed))
                }) else {
                    return;
                };
                if victim.as_ref().is_none_or(|(_, u)| used < *u) {
                    victim = Some((key, used));
                }
            }
            let Some((key, used)) = victim else {
                return;
            };
            if let Some((_, old)) = self
                .map
                .remove_if(&key, |_, h| h.used.load(Ordering::Relaxed) == used)
            {
                self.account(-(old.bytes as i64), budget);
            }
        }
    }
}

/// A row as the hot copy holds it, with its estimated size.
fn hot_row(key: &str, row: Row, budget: &Budget) -> HotRow {
    let bytes = ROW_OVERHEAD
        + key.len()
        + match &row.objects {
            Objects::One(v) => v.len(),
            Objects::Many(objs) => objs.iter().map(|o| o.value.len() + 24).sum(),
        };
    HotRow {
        row,
        bytes,
        used: AtomicU64::new(budget.tick()),
    }
}
