//! A cluster table's operations: reads from the hot copy or PostgreSQL,
//! writes as one PostgreSQL transaction each.
//!
//! # A write
//! 1. `SELECT … FOR UPDATE` the key's row: concurrent writers of the key,
//!    on any node, now wait for this transaction.
//! 2. Compute the operation's outcome with [`rows`](super::rows).
//! 3. Write the row, append to the change log, and add to the table's
//!    statistics in one statement; the new version is taken from the
//!    sequence there, after the row lock, so a key's versions grow in
//!    commit order.
//! 4. Commit, then tell this node's hot copy (so the node reads its own
//!    writes at once).
//!
//! A key that does not exist yet has no row to lock: two transactions may
//! both see it absent, and the second to insert fails on the primary key.
//! Such races (and serialization failures and deadlocks) are retried from
//! step 1, where the loser now sees the winner's row; that is what makes
//! `insert_new` have exactly one winner across nodes.

mod txn;
mod write;

use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Instant;

use deadpool_postgres::GenericClient;

use super::claim;
use super::hot::HotCopy;
use super::rows::{self, Change, Clock, Row, Step};
use super::sql::{
    shard_of, COUNT_SHARDS, DELETE_ROW, EVENT_EVICT, EVENT_EXPIRE, INSERT_ROW, LOCK_ROW,
    SELECT_ROW, UPDATE_ROW,
};
use super::{db_error, retryable, Core};
use crate::ops::{Counts, ReadFrom, TableOps};
use crate::ops::{OpError, OpResult};
use crate::store::{
    CounterOp, Cursor, Entry, Eviction, Expiry, Key, Objects, Precondition, ScanPage, ScanRequest,
    Start, StoreError, Table, TableSpec, TableType, Value, Written,
};

/// A table kept in PostgreSQL, shared by every node of the cluster.
#[derive(Debug)]
pub struct ClusterTable {
    id: i64,
    meta: Arc<Table>,
    hot: Arc<HotCopy>,
    core: Arc<Core>,
}

impl ClusterTable {
    pub(super) fn new(id: i64, meta: Arc<Table>, core: Arc<Core>) -> Self {
        ClusterTable {
            id,
            meta,
            hot: Arc::default(),
            core,
        }
    }

    /// The table's id in PostgreSQL; a re-created table gets a new one.
    pub fn id(&self) -> i64 {
        self.id
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        self.meta.name()
    }

    /// Bytes of this table's rows held in this node's hot copy.
    pub fn hot_bytes(&self) -> u64 {
        self.hot.bytes()
    }

    /// Starts a watch of the table's changes after `since`, as the change
    /// log tells them: every node's changes, in revision order.
    ///
    /// # Errors
    /// [`OpError::Unavailable`] until this node has read the change log
    /// far enough to know where a watch starts; [`OpError::TableNotFound`]
    /// when the table was dropped.
    pub fn watch(&self, since: Option<u64>) -> OpResult<Start> {
        let _order = self
            .core
            .release_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let released = self.core.released.load(Ordering::Acquire);
        if released == 0 {
            return Err(OpError::Unavailable(
                "this node has not read the cluster change log yet".into(),
            ));
        }
        Ok(self.meta.watch(since, || released)?)
    }

    pub(super) fn meta_table(&self) -> &Table {
        &self.meta
    }

    pub(super) fn meta_spec(&self) -> TableSpec {
        self.meta.spec()
    }

    /// Takes on settings and owner another node stored.
    pub(super) fn apply_definition(&self, spec: &TableSpec) {
        let s = &spec.settings;
        self.meta.set_default_ttl_ms(s.default_ttl_ms);
        self.meta.set_max_entries(s.max_entries);
        self.meta.set_eviction(s.eviction);
        self.meta.set_owner(&spec.owner);
    }

    /// Drops the hot copy.
    pub(super) fn forget_rows(&self, budget: &super::Budget) {
        self.hot.clear(budget);
    }

    /// Applies a key change read from the log.
    pub(super) fn key_changed(&self, key: &str, version: u64) {
        self.hot.changed(key, version, &self.core.budget);
    }

    /// Names this table in a "table not found" from PostgreSQL (a write
    /// to a table another node dropped).
    fn named(&self, e: OpError) -> OpError {
        match e {
            OpError::TableNotFound(_) => OpError::TableNotFound(self.name().to_owned()),
            other => other,
        }
    }

    fn kind(&self) -> TableType {
        self.meta.kind()
    }

    fn raw_values(&self) -> bool {
        self.meta.raw_values()
    }

    fn clock(&self) -> Clock {
        Clock {
            now: self.core.now_ms(),
            default_ttl_ms: self.meta.default_ttl_ms(),
        }
    }

    fn row(&self, r: &tokio_postgres::Row) -> Result<Row, OpError> {
        let objects: String = r.get(0);
        let objects = rows::decode(self.kind(), &objects).map_err(|e| {
            OpError::Internal(format!("unreadable row in table '{}': {e}", self.name()))
        })?;
        Ok(Row {
            objects,
            version: r.get::<_, i64>(1).max(0) as u64,
            expires_at: r.get::<_, i64>(2).max(0) as u64,
            modified: crate::store::unix_seconds(r.get::<_, i64>(4).max(0) as u64),
        })
    }

    /// Reads the key's row from PostgreSQL (expired or not) and tells the
    /// hot copy; returns the live entry.
    async fn read_primary(&self, key: &str, now: u64) -> OpResult<Option<Entry>> {
        let ticket = self.hot.ticket(key);
        let client = self.core.client().await?;
        let started = Instant::now();
        let select = client
            .prepare_cached(SELECT_ROW)
            .await
            .map_err(|e| db_error(&e))?;
        let found = client
            .query_opt(&select, &[&self.id, &key])
            .await
            .map_err(|e| db_error(&e))?;
        self.core.timed(started);
        let Some(found) = found else {
            return Ok(None);
        };
        let row = self.row(&found)?;
        if row.is_expired(now) {
            self.hot
                .learn(key, row.version, None, ticket, &self.core.budget);
            return Ok(None);
        }
        let entry = row.entry(now);
        self.hot
            .learn(key, row.version, Some(row), ticket, &self.core.budget);
        Ok(Some(entry))
    }

    /// The key's live entry: from the hot copy when it may answer, else
    /// from PostgreSQL.
    async fn read(&self, key: &str, from: ReadFrom) -> OpResult<Option<Entry>> {
        let now = self.core.now_ms();
        if from == ReadFrom::Nearest && self.core.fresh(now) {
            if let Some(entry) = self.hot.get(key, now, &self.core.budget) {
                self.core.hot_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(entry));
            }
        }
        self.core.hot_misses.fetch_add(1, Ordering::Relaxed);
        self.read_primary(key, now).await
    }

    /// One page of a scan, read from PostgreSQL in key order.
    async fn scan_primary(&self, req: &ScanRequest) -> OpResult<ScanPage> {
        req.check(self.kind() == TableType::OrderedSet)?;
        let single = self.kind().is_single();
        let now = self.core.now_ms();
        let client = self.core.client().await?;
        let mut page = ScanPage::default();
        // Where the next query resumes: (key, last seq returned of it).
        let mut resume: Option<(String, u64)> = req.cursor.as_ref().map(|c| (c.key.clone(), c.seq));
        loop {
            let mut sql = String::from(
                "SELECT key, objects, version, expires_at FROM larder_entries \
                 WHERE table_id = $1 AND (expires_at = 0 OR expires_at > $2)",
            );
            let mut params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>> =
                vec![Box::new(self.id), Box::new(now as i64)];
            let mut bound = |sql: &mut String, op: &str, v: String| {
                params.push(Box::new(v));
                let n = params.len();
                sql.push_str(&format!(" AND key {op} ${n}"));
                n
            };
            if let Some(s) = &req.start {
                bound(&mut sql, ">=", s.clone());
            }
            if let Some(a) = &req.after {
                bound(&mut sql, ">", a.clone());
            }
            if let Some(e) = &req.end {
                bound(&mut sql, "<", e.clone());
            }
            if let Some(p) = &req.prefix {
                let n = bound(&mut sql, ">=", p.clone());
                sql.push_str(&format!(" AND starts_with(key, ${n})"));
            }
            if let Some((key, _)) = &resume {
                let op = match (req.reverse, single) {
                    (true, _) => "<",
                    (false, true) => ">",
                    (false, false) => ">=",
                };
                bound(&mut sql, op, key.clone());
            }
            // One row more than objects still wanted tells whether the scan
            // is complete, and one more again covers the resume key itself,
            // which bag scans read back (`>=`) and may find used up.
            let fetch = (req.limit - page.items.len() + 2) as i64;
            params.push(Box::new(fetch));
            sql.push_str(&format!(
                " ORDER BY key {} LIMIT ${}",
                if req.reverse { "DESC" } else { "ASC" },
                params.len()
            ));
            let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
                .iter()
                .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
                .collect();
            let started = Instant::now();
            let found = client.query(&sql, &refs).await.map_err(|e| db_error(&e))?;
            self.core.timed(started);
            let complete = (found.len() as i64) < fetch;
            for r in &found {
                let key: String = r.get(0);
                let text: String = r.get(1);
                let deadline = r.get::<_, i64>(3).max(0) as u64;
                let objects = rows::decode(self.kind(), &text).map_err(|e| {
                    OpError::Internal(format!("unreadable row in table '{}': {e}", self.name()))
                })?;
                let after_seq = match &resume {
                    Some((k, seq)) if *k == key => *seq,
                    _ => 0,
                };
                let items: Vec<(u64, Value)> = match objects {
                    Objects::One(v) => vec![(0, v)],
                    Objects::Many(objs) => objs
                        .into_iter()
                        .filter(|o| o.seq > after_seq)
                        .map(|o| (o.seq, o.value))
                        .collect(),
                };
                for (seq, value) in items {
                    if page.items.len() == req.limit {
                        let (k, s) = resume.unwrap_or_default();
                        page.next_cursor = Some(Cursor {
                            hash: 0,
                            seq: s,
                            key: k,
                        });
                        return Ok(page);
                    }
                    page.items.push((Key::from(key.as_str()), value));
                    page.positions.push((0, seq));
                    page.deadlines.push(deadline);
                    resume = Some((key.clone(), seq));
                }
            }
            if complete {
                return Ok(page);
            }
        }
    }
}

impl TableOps for ClusterTable {
    fn meta(&self) -> &Arc<Table> {
        &self.meta
    }

    async fn lookup(&self, key: &str, from: ReadFrom) -> OpResult<Option<Entry>> {
        let found = self.read(key, from).await?;
        let stat = if found.is_some() {
            &self.meta.stats.hits
        } else {
            &self.meta.stats.misses
        };
        stat.fetch_add(1, Ordering::Relaxed);
        Ok(found)
    }

    async fn peek(&self, key: &str, from: ReadFrom) -> OpResult<Option<Entry>> {
        self.read(key, from).await
    }

    async fn insert(
        &self,
        key: &str,
        value: Value,
        ttl_ms: Option<u64>,
        pre: &Precondition,
    ) -> OpResult<Written> {
        let kind = self.kind();
        let (written, version, _) = self
            .write(key, |live, clock| {
                let step = rows::insert(kind, live, value.clone(), clock.deadline(ttl_ms), pre)?;
                let written = Written {
                    created: live.is_none(),
                    version: live.map_or(0, |r| r.version),
                    inserted: step.inserted,
                };
                Ok((step, written))
            })
            .await?;
        Ok(Written {
            version: version.unwrap_or(written.version),
            ..written
        })
    }

    async fn insert_many(&self, items: Vec<(String, Value, Expiry)>) -> OpResult<usize> {
        if items.is_empty() {
            return Ok(0);
        }
        let kind = self.kind();
        let keys: Vec<&str> = items.iter().map(|(k, _, _)| k.as_str()).collect();
        self.write_keys(&keys, |i, live, clock| {
            let (_, value, expiry) = &items[i];
            let deadline = match expiry {
                Expiry::After(ttl_ms) => clock.deadline(*ttl_ms),
                Expiry::At(at) => *at,
            };
            let step = rows::insert(kind, live, value.clone(), deadline, &Precondition::None)?;
            Ok((step, ()))
        })
        .await?;
        // Like `insert/2` with a list, every item counts as applied, whether
        // or not a bag already held it.
        Ok(items.len())
    }

    async fn delete(&self, key: &str, pre: &Precondition) -> OpResult<()> {
        self.write(key, |live, _| Ok((rows::delete(live, pre)?, ())))
            .await
            .map(|_| ())
    }

    async fn delete_object(&self, key: &str, value: &Value) -> OpResult<u64> {
        self.write(key, |live, _| {
            let step = rows::delete_object(live, value);
            let removed = step.deleted;
            Ok((step, removed))
        })
        .await
        .map(|(removed, _, _)| removed)
    }

    async fn take(&self, key: &str) -> OpResult<Option<Entry>> {
        let (taken, _, _) = self
            .write(key, |live, clock| {
                let step = rows::delete(live, &Precondition::None)?;
                Ok((step, live.map(|r| r.entry(clock.now))))
            })
            .await?;
        Ok(taken)
    }

    async fn merge(
        &self,
        key: &str,
        patch: &serde_json::Value,
        pre: &Precondition,
    ) -> OpResult<Entry> {
        let kind = self.kind();
        let raw = self.raw_values();
        let (now, _, row) = self
            .write(key, |live, clock| {
                Ok((rows::merge(kind, raw, live, patch, pre, clock)?, clock.now))
            })
            .await?;
        row.map(|r| r.entry(now))
            .ok_or_else(|| OpError::Internal("a merge patch wrote no row".into()))
    }

    async fn update_counter(&self, key: &str, op: &CounterOp) -> OpResult<i64> {
        let kind = self.kind();
        let (n, _, _) = self
            .write(key, |live, clock| rows::counter(kind, live, op, clock))
            .await?;
        Ok(n)
    }

    async fn transact(&self, txn: &crate::store::Txn) -> OpResult<crate::store::TxnOutcome> {
        self.run_txn(txn).await
    }

    async fn scan(&self, req: &ScanRequest, _from: ReadFrom) -> OpResult<ScanPage> {
        self.scan_primary(req).await
    }

    async fn clear(&self) -> OpResult<()> {
        let now = self.core.now_ms();
        let mut client = self.core.client().await?;
        let started = Instant::now();
        let tx = client.transaction().await.map_err(|e| db_error(&e))?;
        let removed = tx
            .query(
                "DELETE FROM larder_entries WHERE table_id = $1 RETURNING key, count, expires_at",
                &[&self.id],
            )
            .await
            .map_err(|e| db_error(&e))?;
        let mut per_shard = vec![(0i64, 0i64, 0i64); COUNT_SHARDS as usize];
        for r in &removed {
            let key: &str = r.get(0);
            let count = i64::from(r.get::<_, i32>(1));
            let expires_at: i64 = r.get(2);
            let s = &mut per_shard[shard_of(key) as usize];
            s.0 += count;
            if expires_at > 0 && expires_at <= now as i64 {
                s.2 += 1;
            } else {
                s.1 += count;
            }
        }
        let shards: Vec<i32> = (0..COUNT_SHARDS as i32).collect();
        let sizes: Vec<i64> = per_shard.iter().map(|s| s.0).collect();
        let deletes: Vec<i64> = per_shard.iter().map(|s| s.1).collect();
        let expired: Vec<i64> = per_shard.iter().map(|s| s.2).collect();
        tx.execute(
            "UPDATE larder_counts c SET size = c.size - u.size, deletes = c.deletes + u.deletes, \
             expired = c.expired + u.expired \
             FROM unnest($2::int[], $3::bigint[], $4::bigint[], $5::bigint[]) AS u(shard, size, deletes, expired) \
             WHERE c.table_id = $1 AND c.shard = u.shard",
            &[&self.id, &shards, &sizes, &deletes, &expired],
        )
        .await
        .map_err(|e| db_error(&e))?;
        tx.execute(
            "INSERT INTO larder_changes (table_id, key, version, kind, at) \
             VALUES ($1, NULL, larder_next_version(), $2, $3)",
            &[&self.id, &super::follow::KIND_CLEAR, &(now as i64)],
        )
        .await
        .map_err(|e| db_error(&e))?;
        tx.commit().await.map_err(|e| db_error(&e))?;
        self.core.timed(started);
        self.hot.clear(&self.core.budget);
        Ok(())
    }

    async fn sync(&self) -> OpResult<()> {
        // Every acknowledged write is already committed.
        Ok(())
    }

    async fn counts(&self) -> OpResult<Counts> {
        let client = self.core.client().await?;
        let started = Instant::now();
        let r = client
            .query_one(
                "SELECT COALESCE(sum(size), 0)::bigint, COALESCE(sum(inserts), 0)::bigint, \
                 COALESCE(sum(deletes), 0)::bigint, COALESCE(sum(expired), 0)::bigint, \
                 COALESCE(sum(evicted), 0)::bigint FROM larder_counts WHERE table_id = $1",
                &[&self.id],
            )
            .await
            .map_err(|e| db_error(&e))?;
        self.core.timed(started);
        let get = |i: usize| r.get::<_, i64>(i).max(0) as u64;
        Ok(Counts {
            size: get(0),
            inserts: get(1),
            deletes: get(2),
            expired: get(3),
            evicted: get(4),
        })
    }

    fn memory_bytes(&self) -> u64 {
        self.hot.bytes()
    }
}
