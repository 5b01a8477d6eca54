//! [`LocalTable`]: the local tier's [`TableOps`], a table of this node's
//! store made as durable as its persistence asks through the write-back
//! tier.

use std::sync::Arc;

use crate::ops::{Counts, OpError, OpResult, ReadFrom, TableOps};
use crate::persist::Durability;
use crate::store::{
    CounterOp, Entry, Expiry, Persistence, Precondition, ScanPage, ScanRequest, StoreResult, Table,
    Txn, TxnOutcome, Value, Written,
};

/// A table of this node's store.
#[derive(Debug, Clone)]
pub struct LocalTable<'a> {
    table: Arc<Table>,
    durability: &'a Durability,
}

impl<'a> LocalTable<'a> {
    /// `table`, made durable through `durability`.
    pub fn new(table: Arc<Table>, durability: &'a Durability) -> Self {
        LocalTable { table, durability }
    }

    /// Applies a write as the table's durability asks: refused (503, 507
    /// on a full disk) while the durable tier does not take writes after a
    /// failed round; on a `sync` table under the tier's gate, with the
    /// ticket to wait for before answering.
    fn apply<T>(
        &self,
        apply: impl FnOnce() -> StoreResult<T>,
    ) -> OpResult<(StoreResult<T>, Option<u64>)> {
        match self.table.persistence() {
            Persistence::Sync => {
                let write = self.durability.sync_write().map_err(not_durable)?;
                let outcome = apply();
                Ok((outcome, Some(write.ticket())))
            }
            Persistence::Periodic => {
                self.durability.accepting().map_err(not_durable)?;
                Ok((apply(), None))
            }
            Persistence::None | Persistence::Cluster => Ok((apply(), None)),
        }
    }

    /// The outcome of a write, answered once what it changed or looked at
    /// is as durable as the table promises: on a `sync` table every answer
    /// waits for its ticket (a delete of an absent key depends on the
    /// removal that made it absent; a 412 on the version it saw), whatever
    /// the outcome, unless the caller took the wait over
    /// ([`crate::persist::deferring`]).
    async fn settled<T>(&self, applied: OpResult<(StoreResult<T>, Option<u64>)>) -> OpResult<T> {
        let (outcome, ticket) = applied?;
        if let Some(ticket) = ticket {
            if !crate::persist::defer_ticket(ticket) {
                self.durability
                    .wait_ticket(ticket)
                    .await
                    .map_err(not_durable)?;
            }
        }
        Ok(outcome?)
    }
}

/// What a write that did not reach disk answers: 507 `storage_full` on a
/// full disk, else 503.
pub fn not_durable(e: crate::persist::PersistError) -> OpError {
    if e.is_disk_full() {
        OpError::StorageFull
    } else {
        OpError::NotDurable {
            source: Box::new(e),
        }
    }
}

impl TableOps for LocalTable<'_> {
    fn meta(&self) -> &Arc<Table> {
        &self.table
    }

    async fn lookup(&self, key: &str, _from: ReadFrom) -> OpResult<Option<Entry>> {
        Ok(self.table.lookup(key))
    }

    async fn peek(&self, key: &str, _from: ReadFrom) -> OpResult<Option<Entry>> {
        Ok(self.table.peek(key))
    }

    async fn insert(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> OpResult<Written> {
        self.settled(self.apply(|| self.table.insert(key, value, ttl_ms, pre)))
            .await
    }

    async fn insert_many(&self, items: Vec<(String, Value, Expiry)>) -> OpResult<usize> {
        self.settled(self.apply(|| self.table.insert_many(items)))
            .await
    }

    async fn delete(&self, key: &str, pre: &Precondition) -> OpResult<()> {
        self.settled(self.apply(|| self.table.delete(key, pre)))
            .await
            .map(|_| ())
    }

    async fn delete_object(&self, key: &str, value: &Value) -> OpResult<u64> {
        self.settled(self.apply(|| Ok(self.table.delete_object(key, value) as u64)))
            .await
    }

    async fn take(&self, key: &str) -> OpResult<Option<Entry>> {
        self.settled(self.apply(|| Ok(self.table.take(key)))).await
    }

    async fn merge(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> OpResult<Entry> {
        self.settled(self.apply(|| self.table.merge(key, patch, pre)))
            .await
    }

    async fn update_counter(&self, key: &str, op: &CounterOp) -> OpResult<i64> {
        self.settled(self.apply(|| self.table.update_counter(key, op)))
            .await
    }

    async fn transact(&self, txn: &Txn) -> OpResult<TxnOutcome> {
        // A write-back round must take all of the transaction or none of
        // it: rounds snapshot and write under the record gate, which the
        // transaction holds (shared) while it applies. A keyed request
        // holds it already.
        let durable = self.table.persistence().is_local_durable();
        let gate = if durable && !crate::persist::holds_record_gate() {
            Some(self.durability.record_gate().await)
        } else {
            None
        };
        let applied = self.apply(|| {
            let (outcome, due) = self.table.transact(txn)?;
            if durable {
                if let Some(key) = first_changed(txn, &outcome) {
                    crate::persist::note_anchor(key);
                }
            }
            Ok((outcome, due))
        });
        drop(gate);
        let (outcome, due) = self.settled(applied).await?;
        if due {
            self.durability.request_round();
        }
        Ok(outcome)
    }

    async fn scan(&self, req: &ScanRequest, _from: ReadFrom) -> OpResult<ScanPage> {
        Ok(self.table.scan(req)?)
    }

    async fn clear(&self) -> OpResult<()> {
        self.settled(self.apply(|| {
            self.table.clear();
            Ok(())
        }))
        .await
    }

    async fn sync(&self) -> OpResult<()> {
        if !self.table.persistence().is_local_durable() {
            return Ok(());
        }
        self.durability
            .wait_durable(true)
            .await
            .map_err(|e| OpError::Unavailable(format!("could not sync: {e}")))
    }

    async fn counts(&self) -> OpResult<Counts> {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.table.stats;
        Ok(Counts {
            size: self.table.size(),
            inserts: s.inserts.load(Relaxed),
            deletes: s.deletes.load(Relaxed),
            expired: s.expired.load(Relaxed),
            evicted: s.evicted.load(Relaxed),
        })
    }

    fn memory_bytes(&self) -> u64 {
        self.table.memory_bytes()
    }
}

/// The first key the branch a transaction took changes, for its
/// idempotency record to go with.
fn first_changed<'t>(txn: &'t Txn, outcome: &TxnOutcome) -> Option<&'t str> {
    let ops = if outcome.succeeded {
        &txn.then
    } else {
        &txn.otherwise
    };
    ops.iter().find(|op| op.changes()).map(|op| op.key())
}
