//! Write-back rounds and the persister thread that runs them.
//!
//! Over 600 lines because a round is one sequence (snapshot, write,
//! fsync, clear or undo, release waiters) whose steps share the round's
//! private state; splitting it would scatter the order that makes it safe.
//!
//! A round ([`Durability::flush_round`]) is the one step: it reads the ticket
//! counter, snapshots the dirty keys of every table that is due, writes their
//! current state in one batch per table, fsyncs once, then clears each dirty
//! mark whose version is unchanged since the snapshot (a key changed again
//! meanwhile stays dirty for the next round) and releases the waiting tickets.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use super::codec::encode_slot;
use super::engine::Change;
use super::{Durability, PersistError};
use crate::store::{Dirty, Key, Persistence, Slot, Table};

/// Longest the persister sleeps when nothing is dirty.
const IDLE_WAKE: Duration = Duration::from_millis(1000);
/// Pause after a failed round before trying again.
const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Rounds the final drain at shutdown may take before giving up.
const DRAIN_ROUNDS: usize = 64;
/// Group commit: while sync writers keep arriving, wait this long at a time
/// before committing, so one fsync covers more of them.
const GATHER_STEP: Duration = Duration::from_micros(200);
/// Group commit: never delay a commit by more than this.
const GATHER_MAX: Duration = Duration::from_millis(2);

/// Keys per write handed to the engine within a round. sled holds a big
/// batch in memory several times over: saving 1M fresh keys of a periodic
/// table in one batch took the server to 1,160 MB resident, in batches of
/// 1024 to 980 MB per 200k keys' worth, in batches of 128 to 472 MB (32 gave
/// no further gain).
pub(super) const WRITE_BATCH: usize = 128;

/// Keys written within one round between engine flushes. A round after a
/// bulk load can hold most of a table, and sled keeps what it wrote since
/// its last flush in memory. Loading 1M fresh keys into a periodic table
/// (rounds of 250k, 650k and 90k keys, written in key order) left the
/// server at 2.95 to 3.14 times the raw bytes resident in four runs with a
/// flush every 32k keys, and at 3.09 and 3.96 in two runs without.
const FLUSH_EVERY: usize = 32 * 1024;

/// Returns memory the allocator holds free to the OS. A big round frees a
/// dirty set's buckets and its snapshot, tens of MB after a bulk load;
/// glibc keeps freed blocks inside its heaps (above its mmap threshold,
/// which rises as big blocks are freed) unless asked.
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn malloc_trim(pad: usize) -> std::os::raw::c_int;
        }
        // SAFETY: malloc_trim only releases free pages of glibc's own
        // heaps; it takes glibc's arena locks and touches no live memory.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// A table's dirty set is shrunk when a round that wrote at least this
/// many keys leaves it empty; smaller sets are left to be reused.
const SHRINK_AFTER: usize = 4096;

/// Writes leave freed memory behind that glibc keeps: the engine's
/// superseded tree nodes, request buffers, a round's snapshot. Loading 1M
/// entries into a `sync` table in requests of 4000 (rounds too small to
/// shrink a dirty set) left the server at 2.88x and 2.89x the raw bytes
/// resident, and at 2.71x and 2.73x once trimmed. So freed memory is also
/// given back once the store made at least this many changes (in any
/// table, memory-only ones too) since the last time, by a round that was
/// asked for (`sync`, shutdown) or that finds nothing to write and no
/// change since the previous such round (the writes have stopped)...
const TRIM_AFTER_QUIET: u64 = 4096;
/// ...and, while writes go on, by a round that leaves every table it
/// wrote clean once this many were made. A trim takes about 2 ms.
const TRIM_AFTER_CHANGES: u64 = 64 * 1024;

/// The metadata key of a table's clear mark: the revision of its latest
/// saved clear. Records at or below it are gone (recovery skips and
/// removes them).
pub(super) fn cleared_key(table: &str) -> String {
    format!("cleared/{table}")
}

/// What a round wrote for one table: keys snapshotted from its dirty set
/// with their mark versions, (`sync` tables only) the state each was
/// written as, and the idempotency records written with them (returned to
/// the queue if the round's flush fails).
struct Snapshot {
    table: Arc<Table>,
    keys: Vec<(Key, u64)>,
    as_written: Vec<Option<Slot>>,
    records: Vec<super::PendingRecord>,
    groups: Vec<Vec<Key>>,
}

/// What a round writes for one table, taken under the record gate.
struct Plan {
    table: Arc<Table>,
    /// The clear mark to save first, 0 for none.
    cleared: u64,
    snapshot: Vec<(Key, u64)>,
    /// Idempotency records, each to go with the key its change wrote.
    records: Vec<super::PendingRecord>,
    /// Keys transactions changed together, each group for one batch.
    groups: Vec<Vec<Key>>,
}

/// Counters of write-back activity. `sync_tickets / rounds` is the average
/// number of sync writes that shared one fsync.
#[derive(Debug, Default)]
pub struct FlushStats {
    /// Rounds that fsynced.
    pub rounds: AtomicU64,
    /// Keys written across all rounds.
    pub keys_written: AtomicU64,
    /// Sync-mode writes made durable.
    pub sync_tickets: AtomicU64,
    /// Duration of the last round, microseconds.
    pub last_round_us: AtomicU64,
    /// Total time spent in rounds, microseconds.
    pub total_round_us: AtomicU64,
    /// Times freed heap memory was given back to the OS after rounds.
    pub trims: AtomicU64,
}

/// What one round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushOutcome {
    /// Keys written.
    pub keys: usize,
    /// Tables that had keys written.
    pub tables: usize,
    /// Sync tickets released.
    pub tickets: u64,
    /// Whether the round fsynced.
    pub fsynced: bool,
}

/// Most bytes of records in one bundle (one past it when a single record
/// is bigger). sled splits a leaf past 16 items and writes a page over
/// about 128 KB as a file of its own, fsynced apart: with bundles this
/// size, a full leaf of them stays a page in the log.
const BUNDLE_BYTES: usize = 4096;

/// A record's id: its key without the record prefix.
fn record_id(key: &[u8]) -> &[u8] {
    key.strip_prefix(super::RECORD_KEY_PREFIX).unwrap_or(key)
}

fn due(table: &Table, dirty: &Dirty, now: u64) -> bool {
    let since = dirty.since_ms.load(Ordering::Acquire);
    if since == 0 {
        return false;
    }
    match table.persistence() {
        Persistence::Sync => true,
        Persistence::Periodic => {
            let interval = table.auto_save_ms().unwrap_or(1000);
            now >= since.saturating_add(interval / 2)
        }
        Persistence::None | Persistence::Cluster => false,
    }
}

impl Durability {
    /// Runs one write-back round; `force` writes every dirty table, due or
    /// not. The persister calls this in a loop; tests may call it directly.
    ///
    /// # Errors
    /// [`PersistError::Engine`]; the keys stay dirty and the waiting tickets are
    /// told the round failed.
    pub fn flush_round(&self, force: bool) -> Result<FlushOutcome, PersistError> {
        let inner = &self.inner;
        // Tables are listed and written under the round lock: a table
        // dropped before it is gone from the list, one dropped after waits
        // until this round's writes are done and then removes them.
        let _round = self.round_guard();
        let started = Instant::now();
        let target = inner.next_ticket.load(Ordering::Acquire);
        let now = inner.store.now_ms();
        let mut written: Vec<Snapshot> = Vec::new();
        // Tables whose clear mark this round saves, with the mark.
        let mut clears: Vec<(Arc<Table>, u64)> = Vec::new();
        let mut keys = 0;
        let mut unflushed = 0;
        let mut shrunk = false;
        // What to write, taken and written while no keyed write is between
        // its change and its record (the record gate), so each change
        // comes with its idempotency record or before it. The gate is held
        // until the last batch is written, not only while the dirty keys
        // are listed: a batch writes each key's live value, which by then
        // may hold later changes, and a later keyed change must not reach
        // the engine without its record (a crash would then keep the
        // change and lose the record, and the retry would apply it again).
        // Held through the writes, it keeps keyed writes from changing
        // anything until the batches are in the engine; writes without a
        // key go on, and the fsync comes after it is released.
        let mut plans: Vec<Plan> = Vec::new();
        let mut wrote_records = false;
        let gate = inner.record_gate.blocking_write();
        {
            for table in inner.store.persistent_tables() {
                let Some(dirty) = table.dirty() else {
                    continue;
                };
                if !force && !due(&table, dirty, now) {
                    continue;
                }
                // Reset before the snapshot: a mark made from here on sets
                // it again, so no change can be left dirty with no due time.
                dirty.since_ms.store(0, Ordering::Release);
                let cleared = dirty.cleared_at.load(Ordering::Acquire);
                let snapshot: Vec<(Key, u64)> = dirty
                    .keys
                    .iter()
                    .map(|e| (e.key().clone(), *e.value()))
                    .collect();
                let records = self.copy_records(table.name());
                if snapshot.is_empty() && cleared == 0 && records.is_empty() {
                    continue;
                }
                let groups = dirty.take_groups();
                plans.push(Plan {
                    table,
                    cleared,
                    snapshot,
                    records,
                    groups,
                });
            }
        }
        crate::failpoint!("writeback-after-snapshot");
        let mut plans = plans.into_iter();
        while let Some(plan) = plans.next() {
            let Plan {
                table,
                cleared,
                mut snapshot,
                records,
                groups,
            } = plan;
            let Some(dirty) = table.dirty() else {
                continue;
            };
            // In key order, as the engine's tree stores them: in the dirty
            // set's hash order a big round touches pages at random and,
            // with a small page cache, reads evicted ones back again and
            // again.
            snapshot.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let batches = super::layout::layout(&mut snapshot, &groups);
            wrote_records |= !records.is_empty();
            let mut as_written = Vec::new();
            let wrote = self.write_table(
                &table,
                cleared,
                (&snapshot, &batches),
                records,
                &mut unflushed,
                &mut as_written,
            );
            let records = match wrote {
                Ok(records) => {
                    self.records_written(table.name(), records.len());
                    records
                }
                Err((e, unwritten)) => {
                    // Still queued; a sync table's are dropped with their
                    // undone changes (`round_failed`), and any of them the
                    // engine took are erased.
                    if table.persistence() == Persistence::Sync {
                        self.requeue_or_erase(&table, unwritten);
                    }
                    // A periodic table's keys stay dirty: their next round
                    // needs the groups again.
                    dirty.return_groups(groups);
                    for later in plans {
                        if let Some(d) = later.table.dirty() {
                            d.return_groups(later.groups);
                            let _ = d.since_ms.compare_exchange(
                                0,
                                now.max(1),
                                Ordering::AcqRel,
                                Ordering::Relaxed,
                            );
                        }
                    }
                    self.round_failed(&written, Some((&table, dirty)), now, &e);
                    return Err(e);
                }
            };
            if cleared != 0 {
                clears.push((table.clone(), cleared));
            }
            keys += snapshot.len();
            written.push(Snapshot {
                table,
                keys: snapshot,
                as_written,
                records,
                groups,
            });
        }
        drop(gate);
        let waiting = target > inner.progress.borrow().durable;
        // Idempotency records written since the last flush need one too.
        let records = inner.records_dirty.swap(false, Ordering::AcqRel) || wrote_records;
        if keys == 0 && clears.is_empty() && !waiting && !records {
            let revision = inner.store.revision();
            if inner.revision_at_idle.swap(revision, Ordering::Relaxed) == revision {
                self.give_back_after(TRIM_AFTER_QUIET);
            }
            return Ok(FlushOutcome::default());
        }
        let flushed = if keys > 0 || records || !clears.is_empty() {
            inner
                .engine
                .put_meta("revision", &inner.store.revision().to_be_bytes())
                .and_then(|()| self.timed_flush())
        } else {
            // Waiters whose changes were already written by an earlier round
            // still need that round's fsync, which has happened: nothing to do.
            Ok(())
        };
        if let Err(e) = flushed {
            if records {
                inner.records_dirty.store(true, Ordering::Release);
            }
            for done in &mut written {
                let records = std::mem::take(&mut done.records);
                self.requeue_or_erase(&done.table, records);
                if let Some(dirty) = done.table.dirty() {
                    dirty.return_groups(std::mem::take(&mut done.groups));
                }
            }
            self.round_failed(&written, None, now, &e);
            return Err(e);
        }
        crate::failpoint!("writeback-before-clear");
        for (table, cleared) in &clears {
            if let Some(dirty) = table.dirty() {
                let _ = dirty.cleared_at.compare_exchange(
                    *cleared,
                    0,
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                );
            }
        }
        let saved_at = inner.store.now_ms();
        // Whether every table written is left clean.
        let mut settled = true;
        for done in &written {
            let (table, snapshot) = (&done.table, &done.keys);
            if let Some(dirty) = table.dirty() {
                let mut slots = done.as_written.iter().cloned();
                for (k, v) in snapshot {
                    table.saved(k, *v, slots.next().flatten());
                }
                dirty.last_saved_at.store(saved_at, Ordering::Release);
                if !dirty.keys.is_empty() {
                    settled = false;
                    let _ = dirty.since_ms.compare_exchange(
                        0,
                        now.max(1),
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    );
                } else if snapshot.len() >= SHRINK_AFTER {
                    // A bulk load left a big, now empty, set behind: give
                    // its buckets back rather than keep them for good.
                    dirty.keys.shrink_to_fit();
                    shrunk = true;
                }
            }
        }
        let mut released = 0;
        inner.progress.send_modify(|p| {
            released = target.saturating_sub(p.durable);
            p.durable = p.durable.max(target);
        });
        let elapsed = started.elapsed().as_micros() as u64;
        let stats = &inner.stats;
        stats
            .rounds
            .fetch_add(u64::from(keys > 0), Ordering::Relaxed);
        stats.keys_written.fetch_add(keys as u64, Ordering::Relaxed);
        stats.sync_tickets.fetch_add(released, Ordering::Relaxed);
        stats.last_round_us.store(elapsed, Ordering::Relaxed);
        stats.total_round_us.fetch_add(elapsed, Ordering::Relaxed);
        if let Some(h) = inner.round_histogram.get() {
            h.record(started.elapsed());
        }
        for Snapshot { table, .. } in &written {
            if table.persistence() == Persistence::Periodic {
                let bound = table.auto_save_ms().unwrap_or(1000);
                if elapsed / 1000 > bound / 2 {
                    tracing::warn!(table = table.name(), elapsed_ms = elapsed / 1000, auto_save_ms = bound,
                        "a save took more than half of auto_save_ms; the loss bound may be exceeded");
                }
            }
        }
        tracing::debug!(
            keys,
            tables = written.len(),
            tickets = released,
            elapsed_us = elapsed,
            "write-back round"
        );
        let outcome = FlushOutcome {
            keys,
            tables: written.len(),
            tickets: released,
            fsynced: keys > 0,
        };
        // The snapshots go first: after a bulk load they are tens of MB.
        drop(written);
        // After the waiters were released: they do not wait for this.
        if shrunk {
            self.give_back_after(0);
        } else if force {
            self.give_back_after(TRIM_AFTER_QUIET);
        } else if settled {
            self.give_back_after(TRIM_AFTER_CHANGES);
        }
        Ok(outcome)
    }

    /// The idempotency records of a round that failed: a periodic table's
    /// go back in the queue (their changes stay dirty and are written
    /// again); a sync table's changes are undone, so their records are
    /// erased from the engine, where the failed round may have put them
    /// and a later flush would otherwise make them durable.
    /// Fsyncs the engine, recording how long it took.
    fn timed_flush(&self) -> Result<(), PersistError> {
        let started = std::time::Instant::now();
        let flushed = self.inner.engine.flush();
        if let Some(h) = self.inner.fsync_histogram.get() {
            h.record(started.elapsed());
        }
        flushed
    }

    fn requeue_or_erase(&self, table: &Table, mut records: Vec<super::PendingRecord>) {
        if records.is_empty() {
            return;
        }
        let name = table.name();
        if table.persistence() != Persistence::Sync {
            // Queued again before they leave the index, so a retry finds
            // them all along; the next round bundles them afresh.
            let bundled: Vec<(u64, Vec<u8>)> = records
                .iter_mut()
                .filter_map(|r| Some((r.bundle.take()?, r.key.clone())))
                .collect();
            self.return_records(name, records);
            self.unindex(name, bundled.iter().map(|(n, key)| (*n, key.as_slice())));
            return;
        }
        let mut erase: Vec<Change> = Vec::new();
        let mut bundles = std::collections::BTreeSet::new();
        for r in &records {
            match r.bundle {
                Some(n) => {
                    bundles.insert(n);
                }
                None => erase.push((r.key.clone(), None)),
            }
        }
        erase.extend(
            bundles
                .into_iter()
                .map(|n| (super::bundle::bundle_key(n), None)),
        );
        if let Err(e) = self.inner.engine.write(name, erase) {
            tracing::error!(error = %e, table = name, "could not erase the records of undone writes");
        }
        self.unindex(
            name,
            records
                .iter()
                .filter_map(|r| Some((r.bundle?, r.key.as_slice()))),
        );
    }

    /// Adds a chunk's records to its changes: in bundles of up to
    /// [`BUNDLE_BYTES`], those the index takes (marked with their bundle's
    /// number), and each of the others on its own. Indexed before the
    /// engine has the bundle: until the round ends the records are still
    /// found in the queue, and a failed round unindexes them
    /// ([`Durability::requeue_or_erase`]).
    fn stage_records(
        &self,
        table: &str,
        records: &mut [super::PendingRecord],
        changes: &mut Vec<Change>,
    ) {
        let inner = &self.inner;
        let mut rest = &mut *records;
        while !rest.is_empty() && inner.locator.has_room(1) {
            let (mut take, mut size) = (0, 0);
            while take < rest.len() && (take == 0 || size + rest[take].bytes.len() <= BUNDLE_BYTES)
            {
                size += rest[take].bytes.len();
                take += 1;
            }
            let (group, tail) = rest.split_at_mut(take);
            rest = tail;
            let n = inner.next_bundle.fetch_add(1, Ordering::Relaxed);
            let ids = group.iter().map(|r| record_id(&r.key));
            let indexed = inner.locator.insert_all(table, ids, n);
            let mut expires_at = 0;
            let mut count = 0;
            for (r, _) in group.iter_mut().zip(&indexed).filter(|(_, &i)| i) {
                r.bundle = Some(n);
                expires_at = expires_at.max(r.expires_at);
                count += 1;
            }
            self.count_index(count);
            if count > 0 {
                let bundled = group
                    .iter()
                    .filter(|r| r.bundle == Some(n))
                    .map(|r| (record_id(&r.key), r.bytes.as_slice()));
                let bytes = super::bundle::encode(bundled, expires_at);
                changes.push((super::bundle::bundle_key(n), Some(bytes)));
            }
        }
        for r in records.iter().filter(|r| r.bundle.is_none()) {
            changes.push((r.key.clone(), Some(r.bytes.clone())));
        }
    }

    /// Forgets index entries `(bundle, record key)` of a failed round.
    fn unindex<'a>(&self, table: &str, entries: impl Iterator<Item = (u64, &'a [u8])>) {
        let mut removed = 0;
        for (n, key) in entries {
            removed += self
                .inner
                .locator
                .remove_all(table, std::iter::once(record_id(key)), n);
        }
        self.count_index(-(removed as i64));
    }

    /// Writes one table's share of a round: its clear mark, then its keys
    /// in batches of [`WRITE_BATCH`], each with the idempotency records
    /// whose change wrote one of its keys (one atomic batch: both or
    /// neither reach disk), then the records whose key is in no batch.
    /// On failure, the records not yet written come back with the error.
    fn write_table(
        &self,
        table: &Table,
        cleared: u64,
        (snapshot, batches): (&[(Key, u64)], &[usize]),
        records: Vec<super::PendingRecord>,
        unflushed: &mut usize,
        as_written: &mut Vec<Option<Slot>>,
    ) -> Result<Vec<super::PendingRecord>, (PersistError, Vec<super::PendingRecord>)> {
        // A sync table's changes can be undone to what was last written.
        let keep = table.persistence() == Persistence::Sync;
        let engine = &self.inner.engine;
        if cleared != 0 {
            // Before the keys written after it: every stored record at or
            // below the mark is gone from here on.
            if let Err(e) = engine.put_meta(&cleared_key(table.name()), &cleared.to_be_bytes()) {
                return Err((e, records));
            }
        }
        // Each record to the batch holding its key, the rest to the end.
        let chunks = batches.len();
        let mut by_chunk: Vec<Vec<super::PendingRecord>> = Vec::new();
        by_chunk.resize_with(chunks + 1, Vec::new);
        let position: std::collections::HashMap<&[u8], usize> = if records.is_empty() {
            Default::default()
        } else {
            snapshot
                .iter()
                .enumerate()
                .map(|(i, (k, _))| (k.as_bytes(), i))
                .collect()
        };
        for record in records {
            let at = record
                .anchor
                .as_deref()
                .and_then(|a| position.get(a))
                .map_or(chunks, |&i| batches.partition_point(|&end| end <= i));
            by_chunk[at].push(record);
        }
        let mut record_batches = by_chunk.into_iter();
        let mut starts = std::iter::once(0).chain(batches.iter().copied());
        let mut ends = batches.iter().copied();
        let mut done = Vec::new();
        while let Some(mut records) = record_batches.next() {
            let keys = match (starts.next(), ends.next()) {
                (Some(from), Some(to)) => &snapshot[from..to],
                _ => &[],
            };
            let mut changes: Vec<Change> = keys
                .iter()
                .map(|(k, _)| {
                    let slot = table.live_slot(k);
                    let record = slot.as_ref().map(encode_slot);
                    if keep {
                        as_written.push(slot);
                    }
                    (k.as_bytes().to_vec(), record)
                })
                .collect();
            self.stage_records(table.name(), &mut records, &mut changes);
            if changes.is_empty() {
                continue;
            }
            let mut wrote = engine.write(table.name(), changes);
            *unflushed += keys.len();
            if wrote.is_ok() && *unflushed >= FLUSH_EVERY {
                // Nothing is released here: only the round's last flush
                // acknowledges anything.
                wrote = self.timed_flush();
                *unflushed = 0;
            }
            if let Err(e) = wrote {
                let mut unwritten = done;
                unwritten.extend(records);
                unwritten.extend(record_batches.flatten());
                return Err((e, unwritten));
            }
            done.extend(records);
        }
        Ok(done)
    }

    /// Gives freed memory back to the OS if the store made at least
    /// `changes` changes since the last time.
    fn give_back_after(&self, changes: u64) {
        let inner = &self.inner;
        let revision = inner.store.revision();
        let since = revision.saturating_sub(inner.revision_at_trim.load(Ordering::Relaxed));
        if since < changes.max(1) {
            return;
        }
        inner.revision_at_trim.store(revision, Ordering::Relaxed);
        let trimming = Instant::now();
        give_back_freed_memory();
        inner.stats.trims.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            elapsed_us = trimming.elapsed().as_micros() as u64,
            "freed memory given back"
        );
    }

    /// After a failed round: keep every key dirty and due; refuse writes
    /// to durable tables until the disk takes writes again; put every
    /// unsaved change of a `sync` table back as it was saved (their
    /// idempotency records go too) and fail every ticket handed out, all
    /// while no `sync` write is between its change and its ticket. So no
    /// request is told a change failed that a later request can see, and
    /// none is told it succeeded that was undone. Periodic tables keep
    /// their changes: their next round writes them.
    fn round_failed(
        &self,
        written: &[Snapshot],
        current: Option<(&Arc<Table>, &Dirty)>,
        now: u64,
        error: &PersistError,
    ) {
        let dirties = written
            .iter()
            .filter_map(|w| w.table.dirty())
            .chain(current.map(|(_, d)| d));
        for dirty in dirties {
            let _ =
                dirty
                    .since_ms
                    .compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Relaxed);
        }
        let inner = &self.inner;
        let full = error.is_disk_full();
        let _gate = inner
            .sync_gate
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        inner.health.store(
            if full { super::FULL } else { super::FAILED },
            Ordering::Release,
        );
        let mut undone = 0;
        for table in inner.store.persistent_tables() {
            if table.persistence() == Persistence::Sync {
                undone += table.undo_unsaved();
                self.discard_records(table.name());
            }
        }
        let handed_out = inner.next_ticket.load(Ordering::Acquire);
        inner.progress.send_modify(|p| {
            p.failed = p.failed.max(handed_out);
            p.full = full;
        });
        tracing::error!(error = %error, full, undone, "a write-back round failed: sync changes undone, writes refused until the disk takes them");
    }

    /// While writes are refused after a failed round: tries the disk with
    /// one small write and a flush (reopening the engine first where it
    /// can), and takes writes again once that works. True when it did.
    fn probe(&self) -> bool {
        let inner = &self.inner;
        if inner.health.load(Ordering::Acquire) == super::HEALTHY {
            return true;
        }
        let now = inner.store.now_ms();
        let tried = inner
            .engine
            .reopen()
            .and_then(|()| inner.engine.has_room(0))
            .and_then(|()| inner.engine.put_meta("probe", &now.to_be_bytes()))
            .and_then(|()| inner.engine.flush());
        match tried {
            Ok(()) => {
                inner.health.store(super::HEALTHY, Ordering::Release);
                tracing::info!("the disk takes writes again: durable writes resume");
                self.wake(true);
                true
            }
            Err(e) => {
                // A database that cannot be reopened on a full disk says
                // so only in words: keep calling it full until it opens.
                let was_full = inner.health.load(Ordering::Acquire) == super::FULL;
                let full = e.is_disk_full() || (was_full && matches!(e, PersistError::Open(_)));
                inner.health.store(
                    if full { super::FULL } else { super::FAILED },
                    Ordering::Release,
                );
                tracing::debug!(error = %e, "the disk does not take writes yet");
                false
            }
        }
    }

    /// How long the persister may sleep before some table is due.
    fn next_wake(&self) -> Duration {
        let now = self.inner.store.now_ms();
        let mut wait = IDLE_WAKE.as_millis() as u64;
        for table in self.inner.store.persistent_tables() {
            let Some(dirty) = table.dirty() else {
                continue;
            };
            let since = dirty.since_ms.load(Ordering::Acquire);
            let interval = table.auto_save_ms().unwrap_or(1000);
            let until = match (table.persistence(), since) {
                (Persistence::Sync, 0) => continue,
                (Persistence::Sync, _) => 0,
                // Clean: look again soon enough to notice the first change
                // well within the bound.
                (_, 0) => interval / 4,
                (_, since) => since.saturating_add(interval / 2).saturating_sub(now),
            };
            wait = wait.min(until);
        }
        Duration::from_millis(wait.max(1))
    }

    /// Group commit's gathering: when sync writers are waiting, keep waiting
    /// in short steps for as long as more of them arrive (at most
    /// [`GATHER_MAX`]). A lone writer pays one [`GATHER_STEP`]; under load
    /// one fsync then covers many writers.
    fn gather_sync_writers(&self) {
        let inner = &self.inner;
        let durable = inner.progress.borrow().durable;
        let mut seen = inner.next_ticket.load(Ordering::Acquire);
        if seen <= durable {
            return;
        }
        let started = Instant::now();
        while started.elapsed() + GATHER_STEP <= GATHER_MAX {
            std::thread::sleep(GATHER_STEP);
            let now = inner.next_ticket.load(Ordering::Acquire);
            if now == seen {
                return;
            }
            seen = now;
        }
    }

    /// Starts the persister thread.
    ///
    /// # Errors
    /// The OS error if the thread cannot be spawned.
    pub fn start(&self) -> std::io::Result<std::thread::JoinHandle<()>> {
        let this = self.clone();
        std::thread::Builder::new()
            .name("larder-persister".into())
            .spawn(move || this.persister_loop())
    }

    fn persister_loop(&self) {
        let inner = &self.inner;
        loop {
            let force = {
                let mut flags = inner.wake.lock().unwrap_or_else(PoisonError::into_inner);
                if !flags.pending && !inner.stopping.load(Ordering::Acquire) {
                    let timeout = self.next_wake();
                    flags = inner
                        .wake_cv
                        .wait_timeout(flags, timeout)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                let force = flags.force;
                flags.pending = false;
                flags.force = false;
                force
            };
            if inner.stopping.load(Ordering::Acquire) {
                return;
            }
            if !self.probe() {
                std::thread::sleep(RETRY_PAUSE);
                continue;
            }
            if inner.store.revision_lease_wanted() {
                if let Err(e) = self.move_lease() {
                    tracing::error!(error = %e, "could not store a new revision lease; retrying");
                }
            }
            if !force {
                self.gather_sync_writers();
            }
            if let Err(e) = self.flush_round(force) {
                tracing::error!(error = %e, "write-back round failed; retrying");
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }

    /// Stops the persister and writes every dirty object: rounds until one
    /// writes nothing, then a final fsync. Call after in-flight requests have
    /// finished.
    ///
    /// # Errors
    /// The first error of the final rounds.
    pub fn shutdown(
        &self,
        persister: Option<std::thread::JoinHandle<()>>,
    ) -> Result<(), PersistError> {
        let inner = &self.inner;
        inner.stopping.store(true, Ordering::Release);
        self.wake(false);
        if let Some(handle) = persister {
            if handle.join().is_err() {
                tracing::error!("the persister thread panicked");
            }
        }
        let mut total = 0;
        for _ in 0..DRAIN_ROUNDS {
            let outcome = self.flush_round(true)?;
            total += outcome.keys;
            if outcome.keys == 0 {
                inner.engine.flush()?;
                let s = &inner.stats;
                let rounds = s.rounds.load(Ordering::Relaxed);
                let tickets = s.sync_tickets.load(Ordering::Relaxed);
                tracing::info!(
                    final_keys = total,
                    rounds,
                    sync_writes = tickets,
                    sync_writes_per_fsync = if rounds > 0 {
                        tickets as f64 / rounds as f64
                    } else {
                        0.0
                    },
                    "durable tier flushed"
                );
                return Ok(());
            }
        }
        Err(PersistError::Round(format!(
            "tables kept changing through {DRAIN_ROUNDS} final rounds"
        )))
    }
}
