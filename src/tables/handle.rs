//! [`TableHandle`]: a table as a request found it, whichever tier keeps
//! it. Handlers call [`TableOps`] on it and never ask where the table
//! lives.

use std::sync::Arc;

use crate::cluster::ClusterTable;
use crate::ops::{Counts, OpResult, ReadFrom, TableOps};
use crate::store::{
    CounterOp, Entry, Expiry, Precondition, ScanPage, ScanRequest, Table, Value, Written,
};

use super::LocalTable;

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

    async fn lookup(&self, key: &str, from: ReadFrom) -> OpResult<Option<Entry>> {
        forward_async!(self, t => t.lookup(key, from))
    }

    async fn peek(&self, key: &str, from: ReadFrom) -> OpResult<Option<Entry>> {
        forward_async!(self, t => t.peek(key, from))
    }

    async fn insert(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> OpResult<Written> {
        forward_async!(self, t => t.insert(key, value, ttl_ms, pre))
    }

    async fn insert_many(&self, items: Vec<(String, Value, Expiry)>) -> OpResult<usize> {
        forward_async!(self, t => t.insert_many(items))
    }

    async fn delete(&self, key: &str, pre: &Precondition) -> OpResult<()> {
        forward_async!(self, t => t.delete(key, pre))
    }

    async fn delete_object(&self, key: &str, value: &Value) -> OpResult<u64> {
        forward_async!(self, t => t.delete_object(key, value))
    }

    async fn take(&self, key: &str) -> OpResult<Option<Entry>> {
        forward_async!(self, t => t.take(key))
    }

    async fn merge(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> OpResult<Entry> {
        forward_async!(self, t => t.merge(key, patch, pre))
    }

    async fn update_counter(&self, key: &str, op: &CounterOp) -> OpResult<i64> {
        forward_async!(self, t => t.update_counter(key, op))
    }

    async fn transact(&self, txn: &crate::store::Txn) -> OpResult<crate::store::TxnOutcome> {
        forward_async!(self, t => t.transact(txn))
    }

    async fn scan(&self, req: &ScanRequest, from: ReadFrom) -> OpResult<ScanPage> {
        forward_async!(self, t => t.scan(req, from))
    }

    async fn clear(&self) -> OpResult<()> {
        forward_async!(self, t => t.clear())
    }

    async fn sync(&self) -> OpResult<()> {
        forward_async!(self, t => t.sync())
    }

    async fn counts(&self) -> OpResult<Counts> {
        forward_async!(self, t => t.counts())
    }

    fn memory_bytes(&self) -> u64 {
        forward!(self, t => t.memory_bytes())
    }
}
