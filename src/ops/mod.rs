//! One interface to a table's operations, whichever tier keeps the table.
//!
//! [`TableOps`] is the contract every tier implements: the local tier
//! (`tables::LocalTable`, this node's store with sled write-back) and the
//! cluster tier ([`ClusterTable`](crate::cluster::ClusterTable), kept in
//! PostgreSQL). Every write returns once it is as durable as the table
//! promises: in memory (`none`, `periodic`), fsynced (`sync`), or committed
//! (`cluster`). [`OpError`] is what the operations fail with; nothing here
//! knows HTTP.

mod error;

pub use error::{OpError, OpResult};

use std::future::Future;
use std::sync::Arc;

use crate::store::{
    CounterOp, Entry, Expiry, Precondition, ScanPage, ScanRequest, Table, Txn, TxnOutcome, Value,
    Written,
};

/// Table-wide figures of table info that only the table's tier can give.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Objects stored.
    pub size: u64,
    /// Objects inserted.
    pub inserts: u64,
    /// Objects removed by delete, delete_object, take or clear.
    pub deletes: u64,
    /// Keys removed because their deadline passed.
    pub expired: u64,
    /// Keys removed to make room under `max_entries`.
    pub evicted: u64,
}

/// Whether a read may be served from this node's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadFrom {
    /// This node's copy; for cluster tables it may lag other nodes' writes
    /// by the staleness bound, never this node's own.
    #[default]
    Nearest,
    /// The table's source of truth (PostgreSQL for cluster tables), like
    /// etcd's linearizable read. The same as `Nearest` for local tables.
    Primary,
}

/// The ETS operations on one table. Every method validates before it
/// changes anything, so an error means nothing changed.
pub trait TableOps {
    /// The table's name, settings, owner and node-local counters.
    fn meta(&self) -> &Arc<Table>;

    /// `lookup/2`, counted as a hit or a miss.
    fn lookup(
        &self,
        key: &str,
        from: ReadFrom,
    ) -> impl Future<Output = OpResult<Option<Entry>>> + Send;

    /// `member/2`: the live entry without counting it.
    fn peek(
        &self,
        key: &str,
        from: ReadFrom,
    ) -> impl Future<Output = OpResult<Option<Entry>>> + Send;

    /// `insert/2` of one object (`insert_new` and compare-and-swap through
    /// `pre`).
    fn insert(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> impl Future<Output = OpResult<Written>> + Send;

    /// `insert/2` with a list, all or nothing. Returns how many objects
    /// were inserted.
    fn insert_many(
        &self,
        items: Vec<(String, Value, Expiry)>,
    ) -> impl Future<Output = OpResult<usize>> + Send;

    /// `delete/2`.
    fn delete(&self, key: &str, pre: &Precondition) -> impl Future<Output = OpResult<()>> + Send;

    /// `delete_object/2`; returns how many objects it removed.
    fn delete_object(&self, key: &str, value: &Value)
        -> impl Future<Output = OpResult<u64>> + Send;

    /// `take/2`: removes the key and returns what it held.
    fn take(&self, key: &str) -> impl Future<Output = OpResult<Option<Entry>>> + Send;

    /// `update_element/3` as a JSON Merge Patch.
    fn merge(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> impl Future<Output = OpResult<Entry>> + Send;

    /// `update_counter/4`; returns the new value.
    fn update_counter(
        &self,
        key: &str,
        op: &CounterOp,
    ) -> impl Future<Output = OpResult<i64>> + Send;

    /// A transaction (etcd `Txn`): its comparisons, then the operations of
    /// the branch they chose, as one step and one durable unit; each
    /// change takes its own revision, in operation order.
    fn transact(&self, txn: &Txn) -> impl Future<Output = OpResult<TxnOutcome>> + Send;

    /// One page of a scan.
    fn scan(
        &self,
        req: &ScanRequest,
        from: ReadFrom,
    ) -> impl Future<Output = OpResult<ScanPage>> + Send;

    /// `delete_all_objects/1`.
    fn clear(&self) -> impl Future<Output = OpResult<()>> + Send;

    /// `dets:sync/1`: returns once everything acknowledged so far is as
    /// durable as the table can make it.
    fn sync(&self) -> impl Future<Output = OpResult<()>> + Send;

    /// Size and statistics of the whole table.
    fn counts(&self) -> impl Future<Output = OpResult<Counts>> + Send;

    /// Estimated bytes this node holds for the table.
    fn memory_bytes(&self) -> u64;
}
