//! Start-up: load every persistent table from disk into memory.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::codec::{decode_slot, StoredTable};
use super::engine::Change;
use super::{Durability, PersistError, LEASE_KEY};
use crate::store::{Key, Table};

/// Bytes of entries read from disk handed to the loading thread at a time.
const LOAD_BATCH_BYTES: usize = 128 * 1024;
/// Batches read ahead of the loading thread at most: with
/// [`LOAD_BATCH_BYTES`], about 1 MB in flight.
const LOAD_QUEUE: usize = 8;

/// Entries read from disk, packed: each key then its value in `bytes`,
/// ending where `ends` says.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    ends: Vec<(usize, usize)>,
}

impl Batch {
    fn push(&mut self, key: &[u8], value: &[u8]) {
        self.bytes.extend_from_slice(key);
        let key_end = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.ends.push((key_end, self.bytes.len()));
    }

    fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut start = 0;
        self.ends.iter().map(move |&(key_end, end)| {
            let entry = (&self.bytes[start..key_end], &self.bytes[key_end..end]);
            start = end;
            entry
        })
    }
}

/// What loading one table's entries found.
#[derive(Default)]
struct Loaded {
    keys: u64,
    max_version: u64,
    /// Stored entries cleared or expired, to be removed.
    expired: Vec<Change>,
}

/// Decodes stored entries of `table` and puts the live ones in it.
fn load_batch(
    table: &Table,
    batch: &Batch,
    (cleared, now): (u64, u64),
    loaded: &mut Loaded,
) -> Result<(), PersistError> {
    let name = table.name();
    for (k, v) in batch.entries() {
        let key = std::str::from_utf8(k)
            .map_err(|_| PersistError::Corrupt(format!("table '{name}': key is not UTF-8")))?;
        let slot = decode_slot(v)
            .map_err(|e| PersistError::Corrupt(format!("table '{name}', key '{key}': {e}")))?;
        loaded.max_version = loaded.max_version.max(slot.version);
        if slot.version <= cleared || slot.is_expired(now) {
            loaded.expired.push((k.to_vec(), None));
        } else {
            table.load_slot(Key::from(key), slot);
            loaded.keys += 1;
        }
    }
    Ok(())
}

/// Decodes and loads a table's entries on a thread of its own while the
/// caller reads the next ones from the engine: on two cores, reading and
/// decoding-and-inserting each take about half of a load (a profile of
/// 1M entries on one thread), so overlapping them shortens start-up.
struct Loader<'scope> {
    batch: Batch,
    to_loader: std::sync::mpsc::SyncSender<Batch>,
    loader: std::thread::ScopedJoinHandle<'scope, Result<Loaded, PersistError>>,
}

impl<'scope> Loader<'scope> {
    fn start<'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        table: &'env Table,
        cleared_now: (u64, u64),
    ) -> Result<Self, PersistError> {
        let (to_loader, batches) = std::sync::mpsc::sync_channel::<Batch>(LOAD_QUEUE);
        let loader = std::thread::Builder::new()
            .name("larder-load".into())
            .spawn_scoped(scope, move || {
                let mut loaded = Loaded::default();
                for batch in batches {
                    // An error drops `batches`: the reader's next send fails
                    // and it stops.
                    load_batch(table, &batch, cleared_now, &mut loaded)?;
                }
                Ok(loaded)
            })
            .map_err(|e| PersistError::Load(format!("cannot start a thread: {e}")))?;
        Ok(Loader {
            batch: Batch::default(),
            to_loader,
            loader,
        })
    }

    /// Queues one stored entry. False once the loading thread stopped (on
    /// an error that [`Loader::finish`] returns).
    fn push(&mut self, key: &[u8], value: &[u8]) -> bool {
        self.batch.push(key, value);
        if self.batch.bytes.len() < LOAD_BATCH_BYTES {
            return true;
        }
        let full = std::mem::take(&mut self.batch);
        self.to_loader.send(full).is_ok()
    }

    /// Hands over the last batch and waits until everything is loaded.
    fn finish(self) -> Result<Loaded, PersistError> {
        let Loader {
            batch,
            to_loader,
            loader,
        } = self;
        // A failed send means the loader stopped: its result says why.
        let _ = to_loader.send(batch);
        drop(to_loader);
        loader
            .join()
            .unwrap_or_else(|_| Err(PersistError::Load("the loading thread panicked".into())))
    }
}

/// What reading a table's idempotency records found: bundled records
/// the index cannot take (to be stored alone) and bundles whose records
/// have all expired (to be removed), the highest bundle number, and how
/// many records the index took.
#[derive(Default)]
struct Records {
    rewrite: Vec<Change>,
    max_bundle: u64,
    indexed: i64,
}

/// What recovery loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Tables loaded.
    pub tables: usize,
    /// Live keys loaded.
    pub keys: u64,
    /// Expired keys dropped from disk.
    pub expired: u64,
    /// Data spaces without a definition, removed.
    pub orphans: usize,
    /// Wall time, milliseconds.
    pub millis: u64,
}

impl Durability {
    /// Loads every stored table into the store. Run once, before serving.
    ///
    /// # Errors
    /// [`PersistError::Engine`], or [`PersistError::Corrupt`] naming the table.
    pub fn recover(&self) -> Result<RecoveryReport, PersistError> {
        let inner = &self.inner;
        let started = Instant::now();
        let mut report = RecoveryReport::default();
        let mut max_version = inner
            .engine
            .get_meta("revision")?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let now = inner.store.now_ms();
        let mut names = HashSet::new();
        for (name, bytes) in inner.engine.table_defs()? {
            let t0 = Instant::now();
            let spec = StoredTable::decode(&bytes)?.into_spec();
            let table = inner
                .store
                .create_table(spec)
                .map_err(|e| PersistError::Corrupt(format!("table '{name}': {e}")))?;
            // A clear saved as one mark: records at or below it are gone.
            let cleared = inner
                .engine
                .get_meta(&super::writeback::cleared_key(&name))?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_be_bytes);
            max_version = max_version.max(cleared);
            let mut records = Records::default();
            let (read, loaded) = std::thread::scope(|scope| {
                let mut loader = Loader::start(scope, &table, (cleared, now))?;
                let read = inner.engine.for_each(&name, &mut |k, v| {
                    if self.read_record(&name, (k, v), now, &mut records)? || loader.push(k, v) {
                        Ok(())
                    } else {
                        Err(PersistError::Load(format!(
                            "table '{name}': loading stopped"
                        )))
                    }
                });
                Ok::<_, PersistError>((read, loader.finish()))
            })?;
            // The loader's error says why reading stopped, when it did.
            let Loaded {
                keys,
                max_version: loaded_max,
                expired,
            } = loaded?;
            read?;
            max_version = max_version.max(loaded_max);
            let Records {
                rewrite: unindexed,
                max_bundle,
                indexed,
            } = records;
            report.expired += expired.len() as u64;
            if !expired.is_empty() {
                inner.engine.write(&name, expired)?;
            }
            if !unindexed.is_empty() {
                inner.engine.write(&name, unindexed)?;
            }
            self.count_index(indexed);
            inner
                .next_bundle
                .fetch_max(max_bundle.saturating_add(1), Ordering::Relaxed);
            tracing::info!(table = %name, keys, elapsed_ms = t0.elapsed().as_millis() as u64, "loaded table");
            report.keys += keys;
            report.tables += 1;
            names.insert(name);
        }
        for space in inner.engine.data_spaces()? {
            if !names.contains(&space) {
                tracing::warn!(table = %space, "removing data of a table dropped before a crash");
                inner.engine.remove_table(&space)?;
                report.orphans += 1;
            }
        }
        inner.engine.flush()?;
        // Past the stored lease: revisions handed out before a crash may
        // have reached it without reaching disk.
        let leased = inner
            .engine
            .get_meta(LEASE_KEY)?
            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
            .map(u64::from_be_bytes);
        inner
            .store
            .observe_revision(max_version.max(leased.map_or(0, |l| l.saturating_add(1))));
        self.move_lease()?;
        report.millis = started.elapsed().as_millis() as u64;
        tracing::info!(
            tables = report.tables,
            keys = report.keys,
            elapsed_ms = report.millis,
            "recovery complete"
        );
        Ok(report)
    }

    /// Takes in an idempotency record or bundle read back from table
    /// `name`; false when `(k, v)` is an entry instead. Records stay on
    /// disk, read when a retry asks: the filter learns which exist, and
    /// the index where each bundled one is.
    fn read_record(
        &self,
        name: &str,
        (k, v): (&[u8], &[u8]),
        now: u64,
        found: &mut Records,
    ) -> Result<bool, PersistError> {
        let inner = &self.inner;
        if let Some(id) = k.strip_prefix(super::RECORD_KEY_PREFIX) {
            // A retry with this key must look on disk.
            inner.record_filter.insert(id);
            return Ok(true);
        }
        let Some(n) = super::bundle::bundle_number(k) else {
            return Ok(false);
        };
        found.max_bundle = found.max_bundle.max(n);
        let b = super::bundle::decode(v)
            .map_err(|e| PersistError::Corrupt(format!("table '{name}': {e}")))?;
        if b.expires_at < now {
            found.rewrite.push((k.to_vec(), None));
            return Ok(true);
        }
        let ids = b.records.iter().map(|(id, _)| *id);
        let taken = inner.locator.insert_all(name, ids, n);
        for ((id, record), taken) in b.records.iter().zip(taken) {
            inner.record_filter.insert(id);
            if taken {
                found.indexed += 1;
            } else {
                found.rewrite.push((
                    [super::RECORD_KEY_PREFIX, id].concat(),
                    Some(record.to_vec()),
                ));
            }
        }
        Ok(true)
    }
}
