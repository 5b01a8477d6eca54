//! Start-up: load every persistent table from disk into memory.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::codec::{decode_slot, StoredTable};
use super::{Durability, PersistError, LEASE_KEY};

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
            let (mut keys, mut expired) = (0u64, Vec::new());
            // Bundled records the index cannot take, to be stored alone,
            // and bundles whose records have all expired, to be removed.
            let mut unindexed: Vec<super::engine::Change> = Vec::new();
            let mut max_bundle = 0;
            let mut indexed = 0;
            inner.engine.for_each(&name, &mut |k, v| {
                if let Some(n) = super::bundle::bundle_number(k) {
                    max_bundle = max_bundle.max(n);
                    let b = super::bundle::decode(v)
                        .map_err(|e| PersistError::Corrupt(format!("table '{name}': {e}")))?;
                    if b.expires_at < now {
                        unindexed.push((k.to_vec(), None));
                        return Ok(());
                    }
                    let ids = b.records.iter().map(|(id, _)| *id);
                    let taken = inner.locator.insert_all(&name, ids, n);
                    for ((id, record), taken) in b.records.iter().zip(taken) {
                        inner.record_filter.insert(id);
                        if taken {
                            indexed += 1;
                        } else {
                            unindexed.push((
                                [super::RECORD_KEY_PREFIX, id].concat(),
                                Some(record.to_vec()),
                            ));
                        }
                    }
                    return Ok(());
                }
                // Idempotency records live beside the entries (see
                // `record_key`); they are read when a retry asks, and the
                // filter learns which exist.
                if let Some(id) = k.strip_prefix(super::RECORD_KEY_PREFIX) {
                    // A retry with this key must look on disk.
                    inner.record_filter.insert(id);
                    return Ok(());
                }
                let key = std::str::from_utf8(k).map_err(|_| {
                    PersistError::Corrupt(format!("table '{name}': key is not UTF-8"))
                })?;
                let slot = decode_slot(v).map_err(|e| {
                    PersistError::Corrupt(format!("table '{name}', key '{key}': {e}"))
                })?;
                max_version = max_version.max(slot.version);
                if slot.version <= cleared || slot.is_expired(now) {
                    expired.push((k.to_vec(), None));
                } else {
                    table.load_slot(key, slot);
                    keys += 1;
                }
                Ok(())
            })?;
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
}
