//! A transaction on a cluster table: its comparisons and the branch they
//! choose in one PostgreSQL transaction. Every key it names (compared or
//! operated on, in both branches) has its row locked in order, so the
//! comparisons are evaluated against rows no other node can change before
//! the commit, never against this node's copy.

use super::write::Wrote;
use super::*;
use crate::store::{Test, Txn, TxnOp, TxnOutcome, TxnResult};

/// What one locked key gives the transaction's answer.
enum Part {
    /// A comparison, or an operation of the branch not taken.
    Nothing,
    /// `put`, `insert_new`, `patch`: the entry as written, at `now`.
    Written(u64),
    /// `get`, `take`: the entry the operation saw.
    Found(Option<Entry>),
    /// `delete`, `delete_object`.
    Deleted(bool),
    /// `counter`: its new value.
    Counter(i64),
}

impl Part {
    /// About how many bytes the result takes in an answer.
    fn size(&self, op: &TxnOp, live: Option<&Row>) -> usize {
        let row = |r: Option<&Row>| {
            r.map_or(0, |r| {
                r.objects.values().map(|v| v.len() + 1).sum::<usize>()
            })
        };
        let written = match op {
            TxnOp::Put { value, .. } | TxnOp::InsertNew { value, .. } => value.len(),
            TxnOp::Patch { patch, .. } => patch.to_string().len(),
            _ => 0,
        };
        op.key().len()
            + 64
            + match self {
                Part::Written(_) => row(live) + written,
                Part::Found(_) => row(live),
                Part::Nothing | Part::Deleted(_) | Part::Counter(_) => 0,
            }
    }
}

impl ClusterTable {
    /// Runs `txn` as one PostgreSQL transaction (see the module docs).
    pub(super) async fn run_txn(&self, txn: &Txn) -> OpResult<TxnOutcome> {
        let kind = self.kind();
        let raw = self.raw_values();
        let (nc, nt) = (txn.compare.len(), txn.then.len());
        let keys: Vec<&str> = txn
            .compare
            .iter()
            .map(|c| c.key.as_str())
            .chain(txn.then.iter().chain(&txn.otherwise).map(TxnOp::key))
            .collect();
        if keys.is_empty() {
            return Ok(TxnOutcome {
                succeeded: true,
                results: Vec::new(),
            });
        }
        // State across the calls of one attempt (reset at its first key):
        // whether every comparison held, and the branch operation last run.
        let mut holds = true;
        let mut last_op: Option<usize> = None;
        let mut bytes = 0usize;
        let done = self
            .write_keys(&keys, |i, live, clock| {
                if i == 0 {
                    holds = true;
                    last_op = None;
                    bytes = 0;
                }
                if i < nc {
                    holds &= test(&txn.compare[i].test, live);
                    return Ok((Step::keep(), Part::Nothing));
                }
                let (taken, at, op) = if i < nc + nt {
                    (holds, i - nc, &txn.then[i - nc])
                } else {
                    (!holds, i - nc - nt, &txn.otherwise[i - nc - nt])
                };
                if !taken {
                    return Ok((Step::keep(), Part::Nothing));
                }
                last_op = Some(at);
                let (step, part) = apply(kind, raw, op, live, clock)?;
                bytes += part.size(op, live);
                match txn.max_result_bytes {
                    limit if limit > 0 && bytes > limit => Err(StoreError::ResultTooLarge {
                        key: op.key().to_owned(),
                        limit,
                    }),
                    _ => Ok((step, part)),
                }
            })
            .await;
        let done = match done {
            Ok(done) => done,
            Err(e @ (OpError::Store(_) | OpError::TableFull(_))) => {
                return Err(match last_op {
                    Some(op) => OpError::TxnAborted {
                        op,
                        cause: Box::new(e),
                    },
                    None => e,
                })
            }
            Err(e) => return Err(e),
        };
        let range = if holds {
            nc..nc + nt
        } else {
            nc + nt..keys.len()
        };
        let results = done
            .into_iter()
            .enumerate()
            .filter(|(i, _)| range.contains(i))
            .map(|(_, (part, wrote))| answer(part, wrote))
            .collect();
        Ok(TxnOutcome {
            succeeded: holds,
            results,
        })
    }
}

/// Whether a comparison holds for the locked row (`None`: absent or
/// expired).
fn test(test: &Test, live: Option<&Row>) -> bool {
    match test {
        Test::Exists(wanted) => live.is_some() == *wanted,
        Test::Revision(r) => live.is_some_and(|row| row.version == *r),
        Test::Value(v) => live.is_some_and(|row| matches!(&row.objects, Objects::One(x) if x == v)),
    }
}

/// One operation on its locked row.
fn apply(
    kind: TableType,
    raw: bool,
    op: &TxnOp,
    live: Option<&Row>,
    clock: Clock,
) -> Result<(Step, Part), StoreError> {
    Ok(match op {
        TxnOp::Put { value, ttl_ms, .. } | TxnOp::InsertNew { value, ttl_ms, .. } => {
            let pre = if matches!(op, TxnOp::InsertNew { .. }) {
                Precondition::Absent
            } else {
                Precondition::None
            };
            let step = rows::insert(kind, live, value.clone(), clock.deadline(*ttl_ms), &pre)?;
            (step, Part::Written(clock.now))
        }
        TxnOp::Delete { .. } => (
            rows::delete(live, &Precondition::None)?,
            Part::Deleted(live.is_some()),
        ),
        TxnOp::DeleteObject { value, .. } => {
            let step = rows::delete_object(live, value);
            let removed = step.deleted > 0;
            (step, Part::Deleted(removed))
        }
        TxnOp::Take { .. } => (
            rows::delete(live, &Precondition::None)?,
            Part::Found(live.map(|r| r.entry(clock.now))),
        ),
        TxnOp::Counter { op, .. } => {
            let (step, n) = rows::counter(kind, live, op, clock)?;
            (step, Part::Counter(n))
        }
        TxnOp::Patch { patch, .. } => (
            rows::merge(kind, raw, live, patch, &Precondition::None, clock)?,
            Part::Written(clock.now),
        ),
        TxnOp::Get { .. } => (Step::keep(), Part::Found(live.map(|r| r.entry(clock.now)))),
    })
}

/// One operation's result, from what it saw and what it wrote.
fn answer(part: Part, wrote: Option<Wrote>) -> TxnResult {
    match part {
        Part::Nothing => TxnResult::Found(None),
        Part::Found(entry) => TxnResult::Found(entry),
        Part::Deleted(d) => TxnResult::Deleted(d),
        Part::Written(now) => TxnResult::Written(wrote.and_then(|w| w.row.map(|r| r.entry(now)))),
        Part::Counter(value) => TxnResult::Counter {
            value,
            revision: wrote.map_or(0, |w| w.version),
        },
    }
}
