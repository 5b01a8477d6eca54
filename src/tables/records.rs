//! Where an idempotency record lives, tier by tier, and how a keyed write
//! runs so that its record travels with its change.
//!
//! The API layer decides what a record says (the answer to replay) and
//! keeps the in-memory map of keys in flight; this module decides where
//! the record is kept and how durable it is:
//! - `none` tables: nowhere but the API's memory;
//! - `periodic` and `sync` tables: beside the table's data in the local
//!   engine, attached to the same write-back batch as the change (a gate
//!   keeps any round from taking the change before its record is attached;
//!   on a `sync` table the write's own wait is deferred to cover both);
//! - cluster tables: in PostgreSQL, claimed and committed in the change's
//!   own transaction (`crate::cluster::claim`), so a retry sent to another
//!   node is answered too.

use std::future::Future;
use std::sync::Arc;

use crate::cluster::claim::{self, Claim, Open, Outcome};
use crate::ops::{OpError, OpResult};
use crate::store::Persistence;

use super::{not_durable, Tables};

/// Where builds before records moved in with their tables' data kept them,
/// in the local engine's metadata.
const LEGACY_PREFIX: &str = "idempotency/";

/// Where a table's records are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordHome {
    /// Only in the API's memory: the table is not durable.
    Memory,
    /// Beside the table's data in the local engine.
    Local {
        /// Whether the table is `sync` (its answers wait for the disk).
        sync: bool,
    },
    /// In the cluster's database.
    Cluster,
}

/// Where the answer of a keyed write is stored.
#[derive(Debug, Clone, Copy)]
pub struct RecordTarget<'a> {
    /// The table the write named.
    pub table: &'a str,
    /// The entry key the write changed, if it names one.
    pub anchor: Option<&'a str>,
    /// The record's id (the hashed caller, table and key).
    pub id: &'a str,
}

/// A keyed write in progress in its tier: what it holds while it runs and
/// what it owes when it ends. End it with [`Recording::keep`], or
/// [`Recording::release`] then [`Recording::settle`]; dropped otherwise, it releases what it holds
/// and the write's change stays unanswered (as after a crash).
pub struct Recording<'a> {
    tables: &'a Tables,
    home: RecordHome,
    /// Held from before the change until its record is attached: no
    /// write-back round may take one without the other.
    gate: Option<tokio::sync::RwLockReadGuard<'a, ()>>,
    /// The cluster claim the write's transaction takes.
    claim: Option<Arc<Claim>>,
    /// The `sync` ticket whose wait the write deferred.
    owed: Option<u64>,
    /// The cluster transaction left open for the record.
    open: Option<Open>,
    /// The key a write whose path names none noted for its record.
    anchor: Option<String>,
}

/// How a keyed write's run ended in its tier.
pub enum Ran<R> {
    /// The write ran here; [`Recording::keep`] (or
    /// [`Recording::release`]) finishes it.
    Here(R),
    /// Another node applied the same key first and committed its answer;
    /// nothing ran here. Read the record again to replay it.
    Elsewhere,
}

impl Tables {
    /// Where `table`'s records are kept. A name this node does not hold is
    /// taken to be a cluster table when the server has a cluster (the
    /// record may have been made on another node).
    pub fn record_home(&self, table: &str) -> RecordHome {
        match self.store.table(table) {
            Ok(t) => match t.persistence() {
                Persistence::Sync => RecordHome::Local { sync: true },
                Persistence::Periodic => RecordHome::Local { sync: false },
                _ => RecordHome::Memory,
            },
            Err(_) if self.cluster.is_some() && !table.is_empty() => RecordHome::Cluster,
            Err(_) => RecordHome::Memory,
        }
    }

    /// The record `id` of `table` as its tier keeps it. `legacy` also looks
    /// where builds before records moved in with their tables' data kept
    /// them.
    ///
    /// # Errors
    /// [`OpError::Internal`] when the engine cannot be read,
    /// [`OpError::Unavailable`] when the cluster cannot be reached.
    pub async fn stored_record(
        &self,
        home: RecordHome,
        table: &str,
        id: &str,
        legacy: bool,
    ) -> OpResult<Option<Vec<u8>>> {
        match home {
            RecordHome::Memory => Ok(None),
            RecordHome::Local { .. } => {
                let read = |e: crate::persist::PersistError| {
                    OpError::Internal(format!("reading an idempotency record: {e}"))
                };
                match self.durability.table_record(table, id).map_err(read)? {
                    Some(found) => Ok(Some(found)),
                    None if legacy => self
                        .durability
                        .record(&format!("{LEGACY_PREFIX}{id}"))
                        .map_err(read),
                    None => Ok(None),
                }
            }
            RecordHome::Cluster => match &self.cluster {
                Some(c) => Ok(c.load_record(id).await?.map(String::into_bytes)),
                None => Ok(None),
            },
        }
    }

    /// At start: removes the legacy records (kept apart from their tables'
    /// data by older builds) that `expired` says have expired, and counts
    /// the others. Nothing is loaded into memory: a retry reads its record
    /// when it needs it.
    ///
    /// # Errors
    /// [`OpError::Internal`] when the engine cannot be read or written.
    pub fn load_legacy_records(&self, expired: impl Fn(&[u8]) -> bool) -> OpResult<usize> {
        let failed = |e: crate::persist::PersistError| {
            OpError::Internal(format!("loading idempotency records: {e}"))
        };
        let mut kept = 0;
        let mut gone = Vec::new();
        self.durability
            .for_each_record(LEGACY_PREFIX, &mut |key, bytes| {
                if expired(bytes) {
                    gone.push(key.to_owned());
                } else {
                    kept += 1;
                }
                Ok(())
            })
            .map_err(failed)?;
        for key in gone {
            self.durability.remove_record(&key).map_err(failed)?;
        }
        Ok(kept)
    }

    /// Removes every locally stored record that `expired` says has
    /// expired (the legacy ones too when `legacy`), and rebuilds the
    /// record filter from those kept. Cluster records are purged by the
    /// cluster's sweeper. Returns how many legacy records remain, when
    /// they were walked. Failures are logged: the next purge tries again.
    pub fn purge_records(&self, legacy: bool, expired: impl Fn(&[u8]) -> bool) -> Option<usize> {
        let durability = &self.durability;
        let mut legacy_kept = None;
        if legacy {
            let (mut gone, mut kept) = (Vec::new(), 0usize);
            let walked = durability.for_each_record(LEGACY_PREFIX, &mut |key, bytes| {
                if expired(bytes) {
                    gone.push(key.to_owned());
                } else {
                    kept += 1;
                }
                Ok(())
            });
            match walked {
                Ok(()) => legacy_kept = Some(kept),
                Err(e) => {
                    tracing::warn!(error = %e, "could not read idempotency records to purge");
                }
            }
            for key in gone {
                if let Err(e) = durability.remove_record(&key) {
                    tracing::warn!(error = %e, "could not remove an expired idempotency record");
                }
            }
        }
        // The records kept make up a fresh filter; the expired ones leave
        // it with their removal.
        let rebuild = durability.rebuild_record_filter();
        let mut gone = Vec::new();
        let walked = durability.for_each_table_record(&mut |table, key, bytes| {
            if expired(bytes) {
                gone.push((table.to_owned(), key.to_vec()));
            } else if let (Some(rebuild), Some(id)) = (
                &rebuild,
                key.strip_prefix(crate::persist::RECORD_KEY_PREFIX),
            ) {
                rebuild.keep(id);
            }
            Ok(())
        });
        // Bundles carry the latest expiry of their records.
        let walked =
            walked.and_then(|()| durability.purge_bundles(self.store.now_ms(), rebuild.as_ref()));
        match (walked, rebuild) {
            (Ok(()), Some(rebuild)) => rebuild.finish(),
            (Ok(()), None) => {}
            (Err(e), _) => {
                tracing::warn!(error = %e, "could not read idempotency records to purge");
            }
        }
        for (table, key) in gone {
            if let Err(e) = durability.remove_table_record(&table, &key) {
                tracing::warn!(error = %e, "could not remove an expired idempotency record");
            }
        }
        legacy_kept
    }

    /// Begins a keyed write whose record, `id`, is forgotten after
    /// `expires_at` (Unix ms).
    pub async fn recording(&self, home: RecordHome, id: &str, expires_at: u64) -> Recording<'_> {
        let gate = match home {
            RecordHome::Local { .. } => Some(self.durability.record_gate().await),
            _ => None,
        };
        let claim =
            matches!(home, RecordHome::Cluster).then(|| Claim::new(id.to_owned(), expires_at));
        Recording {
            tables: self,
            home,
            gate,
            claim,
            owed: None,
            open: None,
            anchor: None,
        }
    }
}

impl Recording<'_> {
    /// Runs the write in its tier's scope: on a `sync` table with its wait
    /// deferred, on a cluster table with its key claimed in the change's
    /// transaction.
    pub async fn run<F: Future>(&mut self, write: F) -> Ran<F::Output> {
        let out = match (self.home, &self.claim) {
            (RecordHome::Local { sync: true }, _) => {
                let ((out, owed), anchor) =
                    crate::persist::keyed(crate::persist::deferring(write)).await;
                self.owed = owed;
                self.anchor = anchor;
                out
            }
            (RecordHome::Local { sync: false }, _) => {
                let (out, anchor) = crate::persist::keyed(write).await;
                self.anchor = anchor;
                out
            }
            (RecordHome::Cluster, Some(claim)) => claim::scope(claim.clone(), write).await,
            _ => write.await,
        };
        match self.claim.as_ref().map(|c| c.outcome()) {
            Some(Outcome::Taken) => Ran::Elsewhere,
            Some(Outcome::Open(open)) => {
                self.open = Some(open);
                Ran::Here(out)
            }
            Some(Outcome::Unused) | None => Ran::Here(out),
        }
    }

    /// Releases what a write whose answer is not remembered holds (it
    /// failed, so it changed nothing): the gate, and the cluster
    /// transaction, committed without a record. [`Recording::settle`]
    /// then waits for what it touched.
    ///
    /// # Errors
    /// [`OpError::Unavailable`] when the cluster commit failed.
    pub async fn release(&mut self) -> OpResult<()> {
        drop(self.gate.take());
        if let Some(open) = self.open.take() {
            open.commit(None).await?;
        }
        Ok(())
    }

    /// Stores `record` (the answer, as JSON, forgotten after `expires_at`)
    /// where the table's tier keeps it, with the write's change, and waits
    /// until both are as durable as the table promises.
    ///
    /// # Errors
    /// [`OpError::Unavailable`] or [`OpError::StorageFull`] when the change
    /// and its record did not become durable; the change is then undone.
    pub async fn keep(
        mut self,
        target: RecordTarget<'_>,
        record: &str,
        expires_at: u64,
    ) -> OpResult<()> {
        let tables = self.tables;
        match self.home {
            RecordHome::Memory => {}
            RecordHome::Local { .. } => {
                // Not attached when the change's round already failed (it
                // was undone); the wait on its ticket then says so.
                tables.durability.attach_record(
                    target.table,
                    target.anchor.or(self.anchor.as_deref()),
                    target.id,
                    (record.as_bytes().to_vec(), expires_at),
                    self.owed,
                );
            }
            RecordHome::Cluster => match (self.open.take(), &tables.cluster) {
                (Some(open), _) => open.commit(Some((record, expires_at))).await?,
                // The write made no cluster change (a table-wide
                // operation): its answer is stored on its own.
                (None, Some(c)) => c.save_record(target.id, record, expires_at).await?,
                (None, None) => {}
            },
        }
        drop(self.gate.take());
        // The write's own wait, deferred to here. The round that makes its
        // ticket durable snapshots the change and the record together (the
        // gate), so one wait covers both.
        self.settle().await
    }

    /// Waits until what the write changed or looked at is as durable as
    /// the table promises (the `sync` wait the write deferred).
    ///
    /// # Errors
    /// [`OpError::Unavailable`] or [`OpError::StorageFull`] when it did
    /// not become durable.
    pub async fn settle(self) -> OpResult<()> {
        match self.owed {
            Some(ticket) => self
                .tables
                .durability
                .wait_ticket(ticket)
                .await
                .map_err(not_durable),
            None => Ok(()),
        }
    }
}
