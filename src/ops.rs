//! One interface to a table's operations, whichever tier keeps the table.
//!
//! [`TableOps`] is what the HTTP handlers call. It has two implementations:
//! [`LocalTable`], a table of this node's in-memory store (with sled
//! write-back for `periodic` and `sync` tables), and
//! [`ClusterTable`](crate::cluster::ClusterTable), a table kept in
//! PostgreSQL and shared by every node. [`TableHandle`] is either, chosen
//! once when the request looks the table up, so handlers never ask where a
//! table lives. Every write returns once it is as durable as the table
//! promises: in memory (`none`, `periodic`), fsynced (`sync`), or committed
//! (`cluster`).

use std::future::Future;
use std::sync::Arc;

use crate::cluster::ClusterTable;
use crate::error::{ApiError, ApiResult};
use crate::persist::Durability;
use crate::store::{
    CounterOp, Entry, Expiry, Persistence, Precondition, ScanPage, ScanRequest, StoreResult, Table,
    Value, Written,
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
    ) -> impl Future<Output = ApiResult<Option<Entry>>> + Send;

    /// `member/2`: the live entry without counting it.
    fn peek(
        &self,
        key: &str,
        from: ReadFrom,
    ) -> impl Future<Output = ApiResult<Option<Entry>>> + Send;

    /// `insert/2` of one object (`insert_new` and compare-and-swap through
    /// `pre`).
    fn insert(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> impl Future<Output = ApiResult<Written>> + Send;

    /// `insert/2` with a list, all or nothing. Returns how many objects
    /// were inserted.
    fn insert_many(
        &self,
        items: Vec<(String, Value, Expiry)>,
    ) -> impl Future<Output = ApiResult<usize>> + Send;

    /// `delete/2`.
    fn delete(&self, key: &str, pre: &Precondition) -> impl Future<Output = ApiResult<()>> + Send;

    /// `delete_object/2`; returns how many objects it removed.
    fn delete_object(
        &self,
        key: &str,
        value: &Value,
    ) -> impl Future<Output = ApiResult<u64>> + Send;

    /// `take/2`: removes the key and returns what it held.
    fn take(&self, key: &str) -> impl Future<Output = ApiResult<Option<Entry>>> + Send;

    /// `update_element/3` as a JSON Merge Patch.
    fn merge(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> impl Future<Output = ApiResult<Entry>> + Send;

    /// `update_counter/4`; returns the new value.
    fn update_counter(
        &self,
        key: &str,
        op: &CounterOp,
    ) -> impl Future<Output = ApiResult<i64>> + Send;

    /// One page of a scan.
    fn scan(
        &self,
        req: &ScanRequest,
        from: ReadFrom,
    ) -> impl Future<Output = ApiResult<ScanPage>> + Send;

    /// `delete_all_objects/1`.
    fn clear(&self) -> impl Future<Output = ApiResult<()>> + Send;

    /// `dets:sync/1`: returns once everything acknowledged so far is as
    /// durable as the table can make it.
    fn sync(&self) -> impl Future<Output = ApiResult<()>> + Send;

    /// Size and statistics of the whole table.
    fn counts(&self) -> impl Future<Output = ApiResult<Counts>> + Send;

    /// Estimated bytes this node holds for the table.
    fn memory_bytes(&self) -> u64;
}

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
    ) -> ApiResult<(StoreResult<T>, Option<u64>)> {
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
    async fn settled<T>(&self, applied: ApiResult<(StoreResult<T>, Option<u64>)>) -> ApiResult<T> {
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
pub fn not_durable(e: crate::persist::PersistError) -> ApiError {
    if e.is_disk_full() {
        ApiError::StorageFull
    } else {
        ApiError::Unavailable(format!("could not make the write durable: {e}"))
    }
}

impl TableOps for LocalTable<'_> {
    fn meta(&self) -> &Arc<Table> {
        &self.table
    }

    async fn lookup(&self, key: &str, _from: ReadFrom) -> ApiResult<Option<Entry>> {
        Ok(self.table.lookup(key))
    }

    async fn peek(&self, key: &str, _from: ReadFrom) -> ApiResult<Option<Entry>> {
        Ok(self.table.peek(key))
    }

    async fn insert(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> ApiResult<Written> {
        self.settled(self.apply(|| self.table.insert(key, value, ttl_ms, pre)))
            .await
    }

    async fn insert_many(&self, items: Vec<(String, Value, Expiry)>) -> ApiResult<usize> {
        self.settled(self.apply(|| self.table.insert_many(items)))
            .await
    }

    async fn delete(&self, key: &str, pre: &Precondition) -> ApiResult<()> {
        self.settled(self.apply(|| self.table.delete(key, pre)))
            .await
            .map(|_| ())
    }

    async fn delete_object(&self, key: &str, value: &Value) -> ApiResult<u64> {
        self.settled(self.apply(|| Ok(self.table.delete_object(key, value) as u64)))
            .await
    }

    async fn take(&self, key: &str) -> ApiResult<Option<Entry>> {
        self.settled(self.apply(|| Ok(self.table.take(key)))).await
    }

    async fn merge(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> ApiResult<Entry> {
        self.settled(self.apply(|| self.table.merge(key, patch, pre)))
            .await
    }

    async fn update_counter(&self, key: &str, op: &CounterOp) -> ApiResult<i64> {
        self.settled(self.apply(|| self.table.update_counter(key, op)))
            .await
    }

    async fn scan(&self, req: &ScanRequest, _from: ReadFrom) -> ApiResult<ScanPage> {
        Ok(self.table.scan(req)?)
    }

    async fn clear(&self) -> ApiResult<()> {
        self.settled(self.apply(|| {
            self.table.clear();
            Ok(())
        }))
        .await
    }

    async fn sync(&self) -> ApiResult<()> {
        if !self.table.persistence().is_local_durable() {
            return Ok(());
        }
        self.durability
            .wait_durable(true)
            .await
            .map_err(|e| ApiError::Unavailable(format!("could not sync: {e}")))
    }

    async fn counts(&self) -> ApiResult<Counts> {
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

/// A table as a request found it: on this node, or in the cluster.
#[derive(Debug, Clone)]
pub enum TableHandle<'a> {
    /// A table of this node's store.
    Local(LocalTable<'a>),
    /// A cluster table.
    Cluster(Arc<ClusterTable>),
}

/// Forwards a call to whichever implementation the handle holds.
macro_rules! forward {
    ($self:ident, $t:ident => $call:expr) => {
        match $self {
            TableHandle::Local($t) => $call,
            TableHandle::Cluster($t) => $call,
        }
    };
}

/// Forwards an async call. A cluster call's future (a PostgreSQL round
/// trip, about 2 KiB) is boxed so that it does not set the size of every
/// handler's future: local calls, the hot path, are a few dozen bytes, and
/// the handler's future is moved into a box on every request.
macro_rules! forward_async {
    ($self:ident, $t:ident => $call:expr) => {
        match $self {
            TableHandle::Local($t) => $call.await,
            TableHandle::Cluster($t) => Box::pin($call).await,
        }
    };
}

impl TableOps for TableHandle<'_> {
    fn meta(&self) -> &Arc<Table> {
        forward!(self, t => t.meta())
    }

    async fn lookup(&self, key: &str, from: ReadFrom) -> ApiResult<Option<Entry>> {
        forward_async!(self, t => t.lookup(key, from))
    }

    async fn peek(&self, key: &str, from: ReadFrom) -> ApiResult<Option<Entry>> {
        forward_async!(self, t => t.peek(key, from))
    }

    async fn insert(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> ApiResult<Written> {
        forward_async!(self, t => t.insert(key, value, ttl_ms, pre))
    }

    async fn insert_many(&self, items: Vec<(String, Value, Expiry)>) -> ApiResult<usize> {
        forward_async!(self, t => t.insert_many(items))
    }

    async fn delete(&self, key: &str, pre: &Precondition) -> ApiResult<()> {
        forward_async!(self, t => t.delete(key, pre))
    }

    async fn delete_object(&self, key: &str, value: &Value) -> ApiResult<u64> {
        forward_async!(self, t => t.delete_object(key, value))
    }

    async fn take(&self, key: &str) -> ApiResult<Option<Entry>> {
        forward_async!(self, t => t.take(key))
    }

    async fn merge(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> ApiResult<Entry> {
        forward_async!(self, t => t.merge(key, patch, pre))
    }

    async fn update_counter(&self, key: &str, op: &CounterOp) -> ApiResult<i64> {
        forward_async!(self, t => t.update_counter(key, op))
    }

    async fn scan(&self, req: &ScanRequest, from: ReadFrom) -> ApiResult<ScanPage> {
        forward_async!(self, t => t.scan(req, from))
    }

    async fn clear(&self) -> ApiResult<()> {
        forward_async!(self, t => t.clear())
    }

    async fn sync(&self) -> ApiResult<()> {
        forward_async!(self, t => t.sync())
    }

    async fn counts(&self) -> ApiResult<Counts> {
        forward_async!(self, t => t.counts())
    }

    fn memory_bytes(&self) -> u64 {
        forward!(self, t => t.memory_bytes())
    }
}
