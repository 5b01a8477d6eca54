//! Transactions: comparisons, then several operations on one table, as one
//! step (etcd's `Txn`).
//!
//! A transaction holds the table's step gate exclusively: every public
//! single-key operation, `clear` and a watch's start hold it shared, so
//! none of them runs while a transaction is half applied. Its operations
//! are the table's own (each takes its revision and its key's shard lock
//! as usual); their events wait in `txn_events` and are published together
//! at the end. An operation that fails puts back every key the
//! transaction touched, as it was (same version: no write-back round can
//! have seen the undone state, the durable tier keeps rounds out while a
//! transaction applies), and the held-back events are dropped.

use std::collections::HashSet;

use super::*;
use crate::store::txn::{Comparison, Test, Txn, TxnOp, TxnOutcome, TxnResult};

impl Table {
    /// Runs `txn`: when every comparison holds its `then` operations, else
    /// its `else` operations, in order, as one step.
    ///
    /// # Errors
    /// [`StoreError::TxnAborted`] naming the operation that failed and why;
    /// nothing was applied.
    ///
    /// On a durable table the keys it changed are noted as one group for
    /// the write-back round (see [`Dirty::groups`]); the second value is
    /// true when the groups are past their bound and a round should run.
    pub fn transact(&self, txn: &Txn) -> StoreResult<(TxnOutcome, bool)> {
        let gates: Vec<_> = self
            .step_gate
            .all()
            .map(|g| g.write().unwrap_or_else(PoisonError::into_inner))
            .collect();
        self.in_txn.store(true, Ordering::Relaxed);
        let inserts = self.stats.inserts.load(Ordering::Relaxed);
        let outcome = self.run_txn(txn);
        self.in_txn.store(false, Ordering::Relaxed);
        let events = std::mem::take(
            &mut *self
                .txn_events
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        // An aborted transaction changed nothing, but the keys it found
        // expired on its way are gone for good.
        let events: Vec<Change> = match &outcome {
            Ok(_) => events,
            Err(_) => events
                .into_iter()
                .filter(|c| c.kind == ChangeKind::Expire)
                .collect(),
        };
        if let (false, Some(hub)) = (events.is_empty(), self.hub.get()) {
            let mut rec = hub.begin();
            for change in events {
                rec.push(change);
            }
        }
        if outcome.is_ok() && self.stats.inserts.load(Ordering::Relaxed) != inserts {
            self.evict_if_needed();
        }
        let mut due = false;
        if let (Ok(done), Some(dirty)) = (&outcome, &self.dirty) {
            let ops = if done.succeeded {
                &txn.then
            } else {
                &txn.otherwise
            };
            let mut seen = HashSet::new();
            let keys: Vec<Key> = ops
                .iter()
                .filter(|op| op.changes() && seen.insert(op.key()))
                .map(|op| Key::from(op.key()))
                .collect();
            if keys.len() > 1 {
                due = dirty.group(keys, self.shared.max_grouped.load(Ordering::Relaxed));
            }
        }
        drop(gates);
        outcome.map(|o| (o, due))
    }

    fn run_txn(&self, txn: &Txn) -> StoreResult<TxnOutcome> {
        let now = self.now();
        let succeeded = txn.compare.iter().all(|c| self.holds(c, now));
        let ops = if succeeded { &txn.then } else { &txn.otherwise };
        // Each key the transaction changes, as it was before its first
        // change, for putting back if a later operation fails.
        let mut before: Vec<(&str, Option<Slot>)> = Vec::new();
        let mut touched: HashSet<&str> = HashSet::new();
        let inserts = self.stats.inserts.load(Ordering::Relaxed);
        let deletes = self.stats.deletes.load(Ordering::Relaxed);
        let mut results = Vec::with_capacity(ops.len());
        let mut bytes = 0usize;
        for (i, op) in ops.iter().enumerate() {
            if op.changes() && touched.insert(op.key()) {
                before.push((op.key(), self.live_slot(op.key())));
            }
            let applied = self.apply_op(op).and_then(|result| {
                bytes += result.size(op.key());
                match txn.max_result_bytes {
                    limit if limit > 0 && bytes > limit => Err(StoreError::ResultTooLarge {
                        key: op.key().to_owned(),
                        limit,
                    }),
                    _ => Ok(result),
                }
            });
            match applied {
                Ok(result) => results.push(result),
                Err(cause) => {
                    for (key, slot) in before.into_iter().rev() {
                        self.reinstate(key, slot);
                    }
                    let undo = |counter: &Counter, was: u64| {
                        let now = counter.load(Ordering::Relaxed);
                        counter.fetch_sub(now.wrapping_sub(was), Ordering::Relaxed);
                    };
                    undo(&self.stats.inserts, inserts);
                    undo(&self.stats.deletes, deletes);
                    return Err(StoreError::TxnAborted {
                        op: i,
                        cause: Box::new(cause),
                    });
                }
            }
        }
        Ok(TxnOutcome { succeeded, results })
    }

    /// Whether a comparison holds now.
    fn holds(&self, c: &Comparison, now: u64) -> bool {
        let Some(slot) = self.map.get(c.key.as_str()) else {
            return matches!(c.test, Test::Exists(false));
        };
        let live = !slot.is_expired(now);
        match &c.test {
            Test::Exists(wanted) => live == *wanted,
            Test::Revision(r) => live && slot.version == *r,
            Test::Value(v) => live && matches!(slot.objects(), ObjectsRef::One(x) if x == v),
        }
    }

    fn apply_op(&self, op: &TxnOp) -> StoreResult<TxnResult> {
        Ok(match op {
            TxnOp::Put { key, value, ttl_ms } | TxnOp::InsertNew { key, value, ttl_ms } => {
                let pre = if matches!(op, TxnOp::InsertNew { .. }) {
                    Precondition::Absent
                } else {
                    Precondition::None
                };
                self.insert_locked(key, value.clone(), Expiry::After(*ttl_ms), &pre)?;
                TxnResult::Written(self.peek_inner(key))
            }
            TxnOp::Delete { key } => {
                TxnResult::Deleted(self.delete_inner(key, &Precondition::None)?)
            }
            TxnOp::DeleteObject { key, value } => {
                TxnResult::Deleted(self.delete_object_inner(key, value) > 0)
            }
            TxnOp::Take { key } => TxnResult::Found(self.take_inner(key)),
            TxnOp::Counter { key, op } => {
                let (value, _) = self.update_counter_locked(key, op)?;
                let revision = self.map.get(key.as_str()).map_or(0, |s| s.version);
                TxnResult::Counter { value, revision }
            }
            TxnOp::Patch { key, patch } => {
                TxnResult::Written(Some(self.merge_inner(key, patch, &Precondition::None)?))
            }
            TxnOp::Get { key } => TxnResult::Found(self.lookup_inner(key)),
        })
    }

    /// Puts `key` back as it was before an aborted transaction changed
    /// it, with its old version: the undone state never reached a
    /// write-back round or a watcher.
    fn reinstate(&self, key: &str, before: Option<Slot>) {
        match (self.map.entry(Key::from(key)), before) {
            (MapEntry::Occupied(o), None) => {
                self.remove_occupied(o, Removal::Undo);
            }
            (MapEntry::Occupied(mut o), Some(prev)) => {
                let now = prev.objects().count() as i64;
                let was = o.get().objects().count() as i64;
                self.size.fetch_add(now - was, Ordering::Relaxed);
                self.modify_occupied(&mut o, |slot| *slot = prev);
            }
            (MapEntry::Vacant(v), Some(prev)) => {
                self.size
                    .fetch_add(prev.objects().count() as i64, Ordering::Relaxed);
                self.mark_dirty(v.key(), prev.version);
                self.place_vacant(v, prev);
            }
            (MapEntry::Vacant(_), None) => {}
        }
    }
}
