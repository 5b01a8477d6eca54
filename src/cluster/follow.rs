//! The background tasks of a node's cluster tier: following the change log,
//! and (on one node at a time) sweeping expired rows and pruning the log.
//!
//! # Reading the log without missing a change
//! Log rows are numbered from a sequence, but numbers are taken before
//! commit, so a row may become visible after a higher-numbered one. The
//! follower therefore orders rows by (writing transaction id, number) and
//! keeps a position in that order that only moves past transactions that
//! had all finished when it read: those older than the oldest transaction
//! still running (the snapshot's `xmin`). Rows of younger transactions that
//! are already visible are applied too, and simply read again on the next
//! poll (applying a change twice is harmless: it only drops older copies).
//! No notification is needed for correctness: the follower polls every
//! `--cluster-poll-ms`.
//!
//! # Freshness
//! A poll that saw everything visible when it started marks the hot copies
//! as current up to that moment. Reads use the hot copy only while that
//! moment is within the staleness bound; a node that cannot reach
//! PostgreSQL stops serving its hot copy once the bound passes.
//!
//! # Gaps
//! The log is pruned after [`RETENTION`]. A node whose position is older
//! than what was pruned (it was cut off for that long) cannot know what it
//! missed: it drops every hot copy, sends `reset` to every watcher, and
//! reloads the table definitions.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use super::sql::{EVENT_DELETE, EVENT_EVICT, EVENT_EXPIRE, EVENT_PUT};
use super::{Cluster, ClusterTable};
use crate::store::{Change, ChangeKind, Key, Value};

/// Log row kinds (`larder_changes.kind`).
pub const KIND_KEY: i16 = 0;
/// A table was created or its settings or owner changed.
pub const KIND_DEFINE: i16 = 1;
/// A table was dropped.
pub const KIND_DROP: i16 = 2;
/// A table was emptied.
pub const KIND_CLEAR: i16 = 3;

/// How long log rows are kept.
pub const RETENTION: Duration = Duration::from_secs(120);

/// Most log rows one poll reads.
const BATCH: i64 = 10_000;

/// Expired rows one sweep removes.
const SWEEP_BATCH: i64 = 1000;

/// Advisory lock key of the sweeper ("larder" in ASCII, plus 2).
const SWEEP_LOCK: i64 = 0x6c61_7264_6572_0002;

const POLL: &str =
    "WITH s AS (SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS xmin, \
        pg_current_xact_id()::text::bigint AS bound, \
        (SELECT value FROM larder_meta WHERE name = 'pruned_xid') AS pxid, \
        (SELECT value FROM larder_meta WHERE name = 'pruned_id') AS pid, \
        (SELECT last_value FROM larder_versions) AS handed) \
    SELECT s.xmin, s.pxid, s.pid, c.xid, c.id, c.table_id, c.key, c.version, c.kind, \
        s.bound, s.handed, c.event, c.value \
    FROM s LEFT JOIN LATERAL (SELECT xid, id, table_id, key, version, kind, event, value \
        FROM larder_changes WHERE (xid, id) > ($1, $2) ORDER BY xid, id LIMIT $3) c ON true";

/// Changes read from the log but not yet told to watchers, and what tells
/// when they may be.
///
/// # Telling watchers in revision order
/// A change's revision is its version, taken from a sequence before its
/// transaction commits, so a change may become visible after one with a
/// higher version. Watchers must get them in version order, so changes
/// wait here until no transaction that is not yet visible can still
/// commit a lower version. A poll reads, after its snapshot, how many
/// versions the sequence has handed out (`handed`). A writer takes its
/// transaction id before its version (through `larder_next_version()`,
/// see `migrations/cluster/0004_*`; `nextval` alone gives no id), so every
/// writer holding one of those versions had its id before `handed` was
/// read, and so before the next poll began.
///
/// Each poll takes a transaction id of its own (`bound`), which is higher
/// than every id given out before it. Once a later poll's `xmin` reaches
/// the next poll's `bound`, every transaction with a lower id has ended
/// and its changes have been read: every version up to `handed` is
/// settled. The snapshot's `xmax` cannot serve as that bound: it is one
/// past the latest transaction to *finish*, so a writer whose id is newer
/// than that is running but in neither `xmin` nor the snapshot's list, and
/// a change of its was once skipped that way. The price is one
/// transaction id per poll (see docs/watch.md).
#[derive(Debug, Default)]
pub(super) struct Events {
    /// Changes waiting, by revision.
    pending: BTreeMap<u64, (Arc<ClusterTable>, Change)>,
    /// `(handed, bound)` of each complete poll not yet settled, oldest
    /// first.
    marks: VecDeque<(u64, i64)>,
}

/// A position in the log: everything at or before it has been applied.
pub type Position = (i64, i64);

impl Cluster {
    /// Where a node that has just started (with empty hot copies) begins:
    /// before every transaction that may still be running.
    pub(super) async fn start_position(&self) -> Result<Position, crate::ops::OpError> {
        let client = self.core.client().await?;
        let row = client
            .query_one(
                "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint",
                &[],
            )
            .await
            .map_err(|e| super::db_error(&e))?;
        Ok((row.get::<_, i64>(0) - 1, i64::MAX))
    }

    /// Reads the log once from `at`; returns the new position and whether
    /// the read saw everything visible (false when a batch was full).
    /// Changes for watchers go to `events`, and are told once settled.
    async fn poll(
        &self,
        at: Position,
        events: &mut Events,
    ) -> Result<(Position, bool), crate::ops::OpError> {
        let client = self.core.client().await?;
        let rows = client
            .query(POLL, &[&at.0, &at.1, &BATCH])
            .await
            .map_err(|e| super::db_error(&e))?;
        let Some(first) = rows.first() else {
            return Ok((at, true));
        };
        let xmin: i64 = first.get(0);
        let bound: i64 = first.get(9);
        let handed = first.get::<_, i64>(10).max(0) as u64;
        let pruned: Position = (
            first.get::<_, Option<i64>>(1).unwrap_or(0),
            first.get::<_, Option<i64>>(2).unwrap_or(0),
        );
        if at < pruned {
            tracing::warn!("this node fell behind the cluster change log; dropping its hot copies");
            // What was missed cannot be told: every watcher gets a reset,
            // at a version of its own (past every version any watcher was
            // told, and before every later change), instead of a stream
            // that silently skips changes.
            let reset_at = client
                .query_one("SELECT larder_next_version()", &[])
                .await
                .map_err(|e| super::db_error(&e))?
                .get::<_, i64>(0)
                .max(0) as u64;
            for t in self.tables.iter() {
                t.forget_rows(&self.core.budget);
                if let Some(hub) = t.meta_table().hub() {
                    hub.publish(Change::new(reset_at, ChangeKind::Reset, None, None));
                }
            }
            self.reload_catalog().await?;
            *events = Events::default();
            return Ok((pruned, false));
        }
        let mut read = 0i64;
        let mut last_final = at;
        for r in &rows {
            let Some(xid) = r.get::<_, Option<i64>>(3) else {
                continue;
            };
            read += 1;
            let id: i64 = r.get(4);
            let table_id: i64 = r.get(5);
            let key: Option<&str> = r.get(6);
            let version = r.get::<_, i64>(7).max(0) as u64;
            let kind: i16 = r.get(8);
            // A drop forgets the table: take it first.
            let dropped = (kind == KIND_DROP)
                .then(|| self.by_id.get(&table_id).map(|t| t.clone()))
                .flatten();
            self.apply(table_id, key, version, kind).await?;
            let event: Option<i16> = r.get(11);
            let value: Option<&str> = r.get(12);
            let table = dropped.or_else(|| self.by_id.get(&table_id).map(|t| t.clone()));
            if let (Some(table), Some(change)) =
                (table, watched_change(kind, key, version, event, value))
            {
                if version > self.core.released.load(Ordering::Acquire) {
                    events.pending.insert(version, (table, change));
                }
            }
            if xid < xmin {
                last_final = (xid, id);
            }
        }
        if read < BATCH {
            // Every row of every transaction older than xmin has been read.
            self.settle(events, xmin, bound, handed);
            let caught_up = (xmin - 1, i64::MAX);
            Ok((at.max(last_final).max(caught_up), true))
        } else {
            Ok((at.max(last_final), false))
        }
    }

    /// After a complete poll: tells watchers every change whose revision
    /// is settled (see [`Events`]), in revision order.
    fn settle(&self, events: &mut Events, xmin: i64, bound: i64, handed: u64) {
        events.marks.push_back((handed, bound));
        let Some(upto) = settle_marks(&mut events.marks, xmin) else {
            return;
        };
        let later = events.pending.split_off(&upto.saturating_add(1));
        let ready = std::mem::replace(&mut events.pending, later);
        // Under the lock that starts watches, so a watch starts either
        // before these changes are told or after `released` covers them.
        let _order = self
            .core
            .release_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (_, (table, change)) in ready {
            if let Some(hub) = table.meta_table().hub() {
                if change.kind == ChangeKind::Drop {
                    hub.drop_table(|| change.revision);
                } else {
                    hub.publish(change);
                }
            }
        }
        self.core.released.fetch_max(upto.max(1), Ordering::AcqRel);
    }

    async fn apply(
        &self,
        table_id: i64,
        key: Option<&str>,
        version: u64,
        kind: i16,
    ) -> Result<(), crate::ops::OpError> {
        match (kind, key) {
            (KIND_KEY, Some(key)) => {
                if let Some(t) = self.by_id.get(&table_id) {
                    t.key_changed(key, version);
                }
            }
            (KIND_DEFINE, _) => match self.load_definition_by_id(table_id).await? {
                Some(def) => {
                    if let Err(e) = self.register(def) {
                        tracing::warn!(error = %e, "cluster table skipped");
                    }
                }
                None => self.forget(table_id),
            },
            (KIND_DROP, _) => self.forget(table_id),
            (KIND_CLEAR, _) => {
                if let Some(t) = self.by_id.get(&table_id) {
                    t.forget_rows(&self.core.budget);
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Drops the marks a poll with `xmin` settles and returns the highest
/// settled version: a mark's versions are settled once every transaction
/// that had an id by the next poll has ended.
fn settle_marks(marks: &mut VecDeque<(u64, i64)>, xmin: i64) -> Option<u64> {
    let mut settled = None;
    while marks.len() >= 2 && xmin >= marks[1].1 {
        settled = marks.pop_front().map(|(handed, _)| handed);
    }
    settled
}

/// The change a log row tells watchers, if any.
fn watched_change(
    kind: i16,
    key: Option<&str>,
    version: u64,
    event: Option<i16>,
    value: Option<&str>,
) -> Option<Change> {
    let kind = match (kind, event) {
        (KIND_CLEAR, _) => return Some(Change::new(version, ChangeKind::Clear, None, None)),
        (KIND_DROP, _) => return Some(Change::new(version, ChangeKind::Drop, None, None)),
        (KIND_KEY, Some(EVENT_PUT)) if value.is_some() => ChangeKind::Put,
        (KIND_KEY, Some(EVENT_DELETE)) => ChangeKind::Delete,
        (KIND_KEY, Some(EVENT_EXPIRE)) => ChangeKind::Expire,
        (KIND_KEY, Some(EVENT_EVICT)) => ChangeKind::Evict,
        _ => return None,
    };
    Some(Change::new(
        version,
        kind,
        Some(Key::from(key?)),
        value.map(|v| Value::from_canonical(v.as_bytes())),
    ))
}

/// Follows the change log for as long as the process runs.
pub(super) async fn follow(cluster: Cluster, mut at: Position) {
    let poll = cluster.config.poll.max(Duration::from_millis(1));
    let mut failing = false;
    let mut events = Events::default();
    loop {
        let started = cluster.core.now_ms();
        match cluster.poll(at, &mut events).await {
            Ok((next, complete)) => {
                at = next;
                cluster.core.reachable.store(true, Ordering::Release);
                if failing {
                    tracing::info!("cluster database reachable again");
                    failing = false;
                }
                if complete {
                    cluster
                        .core
                        .synced_at
                        .fetch_max(started.max(1), Ordering::AcqRel);
                    cluster.core.polls.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(poll).await;
                }
            }
            Err(e) => {
                cluster.core.reachable.store(false, Ordering::Release);
                if !failing {
                    tracing::warn!(error = %e, "cannot read the cluster change log; retrying");
                    failing = true;
                }
                tokio::time::sleep(poll.max(Duration::from_millis(100))).await;
            }
        }
    }
}

/// Sweeps expired rows and prunes the log while this node holds the
/// sweeper lock; keeps trying to take it otherwise.
pub(super) async fn sweep(cluster: Cluster) {
    loop {
        if let Err(e) = sweep_while_holding(&cluster).await {
            tracing::debug!(error = %e, "cluster sweeper connection ended");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn sweep_while_holding(cluster: &Cluster) -> Result<(), tokio_postgres::Error> {
    // A connection of its own: the lock belongs to the session.
    let (mut client, connection) = cluster.pg_config.connect(cluster.tls.0.clone()).await?;
    let conn = tokio::spawn(connection);
    let result = async {
        loop {
            let held: bool = client
                .query_one("SELECT pg_try_advisory_lock($1)", &[&SWEEP_LOCK])
                .await?
                .get(0);
            if held {
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tracing::debug!("this node sweeps the cluster tables");
        let mut last_prune = 0u64;
        loop {
            let now = cluster.core.now_ms();
            let swept = sweep_once(&mut client, now).await?;
            if now.saturating_sub(last_prune) >= 1000 {
                prune(&client, now).await?;
                last_prune = now;
            }
            if swept < SWEEP_BATCH as usize {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    .await;
    conn.abort();
    result
}

/// Removes up to [`SWEEP_BATCH`] expired rows, counting each once.
async fn sweep_once(
    client: &mut tokio_postgres::Client,
    now: u64,
) -> Result<usize, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let gone = tx
        .query(
            "DELETE FROM larder_entries WHERE (table_id, key) IN \
             (SELECT table_id, key FROM larder_entries WHERE expires_at > 0 AND expires_at <= $1 \
              LIMIT $2 FOR UPDATE SKIP LOCKED) RETURNING table_id, key, count",
            &[&(now as i64), &SWEEP_BATCH],
        )
        .await?;
    if gone.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let tables: Vec<i64> = gone.iter().map(|r| r.get(0)).collect();
    let keys: Vec<String> = gone.iter().map(|r| r.get(1)).collect();
    let counts: Vec<i64> = gone.iter().map(|r| i64::from(r.get::<_, i32>(2))).collect();
    let shards: Vec<i32> = keys.iter().map(|k| super::sql::shard_of(k)).collect();
    tx.execute(
        "INSERT INTO larder_changes (table_id, key, version, kind, at, event) \
         SELECT t, k, larder_next_version(), 0, $3, $4 FROM unnest($1::bigint[], $2::text[]) AS u(t, k)",
        &[&tables, &keys, &(now as i64), &super::sql::EVENT_EXPIRE],
    )
    .await?;
    tx.execute(
        "UPDATE larder_counts c SET size = c.size - u.size, expired = c.expired + u.n \
         FROM (SELECT t, s, sum(n)::bigint AS size, count(*)::bigint AS n \
               FROM unnest($1::bigint[], $2::int[], $3::bigint[]) AS x(t, s, n) GROUP BY t, s) AS u \
         WHERE c.table_id = u.t AND c.shard = u.s",
        &[&tables, &shards, &counts],
    )
    .await?;
    tx.commit().await?;
    Ok(gone.len())
}

/// Deletes log rows older than [`RETENTION`] of finished transactions and
/// records how far the log was pruned.
async fn prune(client: &tokio_postgres::Client, now: u64) -> Result<(), tokio_postgres::Error> {
    client
        .execute(
            "DELETE FROM larder_idempotency WHERE expires_at < $1",
            &[&(now as i64)],
        )
        .await?;
    let cutoff = now.saturating_sub(RETENTION.as_millis() as u64) as i64;
    let last = client
        .query_opt(
            "WITH d AS (DELETE FROM larder_changes WHERE at < $1 \
                 AND xid < pg_snapshot_xmin(pg_current_snapshot())::text::bigint RETURNING xid, id) \
             SELECT xid, id FROM d ORDER BY xid DESC, id DESC LIMIT 1",
            &[&cutoff],
        )
        .await?;
    if let Some(last) = last {
        let (xid, id): (i64, i64) = (last.get(0), last.get(1));
        client
            .execute(
                "UPDATE larder_meta SET value = CASE name WHEN 'pruned_xid' THEN $1 ELSE $2 END \
                 WHERE name IN ('pruned_xid', 'pruned_id') AND \
                 (SELECT (x.value, i.value) < ($1, $2) FROM larder_meta x, larder_meta i \
                  WHERE x.name = 'pruned_xid' AND i.name = 'pruned_id')",
                &[&xid, &id],
            )
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_settle_only_once_the_next_polls_transactions_ended() {
        let mut marks = VecDeque::new();
        // Poll 1: 100 versions handed out, transactions below 50 had ids.
        marks.push_back((100, 50));
        assert_eq!(
            settle_marks(&mut marks, 40),
            None,
            "one poll settles nothing"
        );
        // Poll 2: 120 handed out, ids below 60. Transaction 55 may have
        // taken a version below 100 before it had an id: wait for it.
        marks.push_back((120, 60));
        assert_eq!(settle_marks(&mut marks, 55), None);
        marks.push_back((130, 70));
        assert_eq!(settle_marks(&mut marks, 60), Some(100));
        // Poll 4 with nothing running: 120 and 130 settle together.
        marks.push_back((140, 80));
        assert_eq!(settle_marks(&mut marks, 80), Some(130));
        assert_eq!(marks, [(140, 80)]);
    }
}
