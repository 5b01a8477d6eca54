//! What a transaction says and what it answers, shared by every tier: the
//! store runs them on a local table (`Table::transact`), the cluster tier
//! in one PostgreSQL transaction.

use super::counter::CounterOp;
use super::slot::Entry;
use super::value::Value;

/// Most operations in one branch of a transaction.
pub const MAX_TXN_OPS: usize = 128;
/// Most comparisons in one transaction.
pub const MAX_TXN_COMPARISONS: usize = 128;

/// What one comparison of a transaction's `if` tests on its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Test {
    /// The key's live entry is at this revision (an absent key fails).
    Revision(u64),
    /// The key holds at least one object (`true`) or none (`false`).
    Exists(bool),
    /// The key's value equals this one (set types only; absent fails).
    Value(Value),
}

/// One comparison of a transaction's `if`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// The key compared.
    pub key: String,
    /// What must hold.
    pub test: Test,
}

/// One operation of a transaction's branch: the single-key operations of
/// the entry routes, with their arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOp {
    /// `insert`: replaces (set types) or adds (bag types).
    Put {
        /// The key.
        key: String,
        /// The object.
        value: Value,
        /// Expiry; `None` takes the table's default.
        ttl_ms: Option<u64>,
    },
    /// `insert_new`: fails when the key exists.
    InsertNew {
        /// The key.
        key: String,
        /// The object.
        value: Value,
        /// Expiry; `None` takes the table's default.
        ttl_ms: Option<u64>,
    },
    /// `delete`.
    Delete {
        /// The key.
        key: String,
    },
    /// `delete_object`.
    DeleteObject {
        /// The key.
        key: String,
        /// The object to remove.
        value: Value,
    },
    /// `take`.
    Take {
        /// The key.
        key: String,
    },
    /// `update_counter`.
    Counter {
        /// The key.
        key: String,
        /// The counter body.
        op: CounterOp,
    },
    /// `update_element` as a JSON Merge Patch.
    Patch {
        /// The key.
        key: String,
        /// The merge patch (a JSON object).
        patch: serde_json::Value,
    },
    /// `lookup`, seeing the transaction's earlier operations.
    Get {
        /// The key.
        key: String,
    },
}

impl TxnOp {
    /// The key the operation works on.
    pub fn key(&self) -> &str {
        match self {
            TxnOp::Put { key, .. }
            | TxnOp::InsertNew { key, .. }
            | TxnOp::Delete { key }
            | TxnOp::DeleteObject { key, .. }
            | TxnOp::Take { key }
            | TxnOp::Counter { key, .. }
            | TxnOp::Patch { key, .. }
            | TxnOp::Get { key } => key,
        }
    }

    /// Whether the operation may change its key (every one but `get`).
    pub fn changes(&self) -> bool {
        !matches!(self, TxnOp::Get { .. })
    }
}

/// A transaction: comparisons, and the operations to run when they all
/// hold (`then`) or when one does not (`otherwise`, the `else` branch).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Txn {
    /// Every one must hold for `then` to run.
    pub compare: Vec<Comparison>,
    /// Run when every comparison holds.
    pub then: Vec<TxnOp>,
    /// Run otherwise.
    pub otherwise: Vec<TxnOp>,
    /// Most bytes the results may hold (0: no limit): past it the
    /// transaction is refused with nothing applied, as its answer could
    /// not be sent.
    pub max_result_bytes: usize,
}

impl Txn {
    /// The keys the transaction may change, in the order of their first
    /// appearance (both branches).
    pub fn written_keys(&self) -> Vec<&str> {
        let mut seen = std::collections::HashSet::new();
        self.then
            .iter()
            .chain(&self.otherwise)
            .filter(|op| op.changes())
            .map(TxnOp::key)
            .filter(|k| seen.insert(*k))
            .collect()
    }
}

/// What one operation of the branch taken answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnResult {
    /// `put`, `insert_new`, `patch`: the entry after the operation
    /// (`None` only if it expired at once).
    Written(Option<Entry>),
    /// `get`, `take`: the entry, `None` when absent.
    Found(Option<Entry>),
    /// `delete`, `delete_object`: whether anything was removed.
    Deleted(bool),
    /// `counter`: the new value and the key's revision after it.
    Counter {
        /// The counter after the update.
        value: i64,
        /// The key's revision after the update.
        revision: u64,
    },
}

impl TxnResult {
    /// About how many bytes the result takes in an answer.
    pub fn size(&self, key: &str) -> usize {
        let entry = |e: &Option<Entry>| {
            e.as_ref().map_or(0, |e| {
                e.objects.values().map(|v| v.len() + 1).sum::<usize>()
            })
        };
        key.len()
            + 64
            + match self {
                TxnResult::Written(e) | TxnResult::Found(e) => entry(e),
                TxnResult::Deleted(_) | TxnResult::Counter { .. } => 0,
            }
    }
}

/// A transaction's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnOutcome {
    /// Whether every comparison held (`then` ran).
    pub succeeded: bool,
    /// One result per operation of the branch taken.
    pub results: Vec<TxnResult>,
}
