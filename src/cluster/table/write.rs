//! A cluster write as one PostgreSQL transaction: lock the key's row,
//! compute the operation's outcome with [`rows`](crate::cluster::rows),
//! write the row, the change log and the statistics, commit, then tell the
//! hot copy. Lost races are retried; keyed writes claim their key in the
//! same transaction (see [`claim`](crate::cluster::claim)). The steps are
//! listed in the parent module.

use super::*;

/// Most attempts of a write that keeps losing races.
const MAX_ATTEMPTS: usize = 32;

/// Why a transaction attempt ended without a result.
enum Fail {
    /// It lost a race; run it again.
    Retry,
    /// It failed for good.
    Api(OpError),
}

impl From<OpError> for Fail {
    fn from(e: OpError) -> Self {
        Fail::Api(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Api(e.into())
    }
}

impl From<tokio_postgres::Error> for Fail {
    fn from(e: tokio_postgres::Error) -> Self {
        if retryable(&e) {
            Fail::Retry
        } else {
            Fail::Api(db_error(&e))
        }
    }
}

/// A key's row after a committed write: what the hot copy learns.
pub(super) struct Wrote {
    pub(super) version: u64,
    pub(super) row: Option<Row>,
}

/// The statistics one write moves.
#[derive(Default)]
struct Delta {
    size: i64,
    inserts: i64,
    deletes: i64,
    expired: i64,
    evicted: i64,
}

impl ClusterTable {
    /// Runs `op` on the key's row in a transaction, retrying lost races,
    /// and returns its result with the key's version and row after the
    /// write (`None` when it changed nothing).
    pub(super) async fn write<T: Send>(
        &self,
        key: &str,
        mut op: impl FnMut(Option<&Row>, Clock) -> Result<(Step, T), StoreError> + Send,
    ) -> OpResult<(T, Option<u64>, Option<Row>)> {
        let mut done = self
            .write_keys(&[key], |_, live, clock| op(live, clock))
            .await?;
        let (result, wrote) = done
            .pop()
            .ok_or_else(|| OpError::Internal("a one-key write returned no result".into()))?;
        Ok(match wrote {
            Some(w) => (result, Some(w.version), w.row),
            None => (result, None, None),
        })
    }

    /// Runs `op(i, row, clock)` on the row of each `keys[i]`, in order, in
    /// one transaction (all or nothing), retrying lost races; after commit
    /// tells the hot copy what was written.
    pub(super) async fn write_keys<T: Send>(
        &self,
        keys: &[&str],
        mut op: impl FnMut(usize, Option<&Row>, Clock) -> Result<(Step, T), StoreError> + Send,
    ) -> OpResult<Vec<(T, Option<Wrote>)>> {
        if let Some(claim) = claim::current() {
            return self.write_keys_claimed(&claim, keys, op).await;
        }
        let mut client = self.core.client().await?;
        let shard = txn_shard(keys);
        'attempt: for _ in 0..MAX_ATTEMPTS {
            let tickets: Vec<_> = keys.iter().map(|k| self.hot.ticket(k)).collect();
            let started = Instant::now();
            let tx = client.transaction().await.map_err(|e| db_error(&e))?;
            let mut done = Vec::with_capacity(keys.len());
            for (i, key) in keys.iter().enumerate() {
                match self
                    .write_key(&tx, key, shard, &mut |live: Option<&Row>, clock: Clock| {
                        op(i, live, clock)
                    })
                    .await
                {
                    Ok(one) => done.push(one),
                    Err(Fail::Retry) => continue 'attempt,
                    Err(Fail::Api(e)) => return Err(self.named(e)),
                }
            }
            match tx.commit().await {
                Ok(()) => {}
                Err(e) if retryable(&e) => continue,
                Err(e) => return Err(db_error(&e)),
            }
            self.core.timed(started);
            // All of a multi-key write at once for this node's readers.
            let _all = (keys.len() > 1).then(|| self.hot.exclusive());
            for ((_, wrote), (key, ticket)) in done.iter().zip(keys.iter().zip(tickets)) {
                if let Some(w) = wrote {
                    self.hot
                        .learn(key, w.version, w.row.clone(), ticket, &self.core.budget);
                }
            }
            return Ok(done);
        }
        Err(OpError::Unavailable(
            "the write kept conflicting with concurrent writes; retry".into(),
        ))
    }

    /// [`write_keys`](Self::write_keys) for a keyed request: the writes
    /// join the transaction that claims the request's key, which stays
    /// open until the idempotency layer has stored the answer in it (see
    /// [`claim`]). A later write of the same request joins the same
    /// transaction; any failure rolls back the whole request.
    async fn write_keys_claimed<T: Send>(
        &self,
        claim: &claim::Claim,
        keys: &[&str],
        mut op: impl FnMut(usize, Option<&Row>, Clock) -> Result<(Step, T), StoreError> + Send,
    ) -> OpResult<Vec<(T, Option<Wrote>)>> {
        for _ in 0..MAX_ATTEMPTS {
            let (mut tx, fresh) = match claim.take_open() {
                Some(tx) => (tx, false),
                None => match claim.begin(&self.core).await? {
                    Some(tx) => (tx, true),
                    // Replayed by the idempotency layer; this answer is
                    // never sent.
                    None => return Err(OpError::IdempotencyInFlight),
                },
            };
            let tickets: Vec<_> = keys.iter().map(|k| self.hot.ticket(k)).collect();
            let shard = txn_shard(keys);
            let mut done = Vec::with_capacity(keys.len());
            let mut failed = None;
            for (i, key) in keys.iter().enumerate() {
                match self
                    .write_key(
                        tx.client(),
                        key,
                        shard,
                        &mut |live: Option<&Row>, clock: Clock| op(i, live, clock),
                    )
                    .await
                {
                    Ok(one) => done.push(one),
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => {}
                Some(Fail::Retry) if fresh => {
                    tx.rollback().await;
                    continue;
                }
                Some(Fail::Retry) => {
                    tx.rollback().await;
                    return Err(OpError::Unavailable(
                        "the request's writes conflicted with concurrent writes; retry".into(),
                    ));
                }
                Some(Fail::Api(e)) => {
                    tx.rollback().await;
                    return Err(self.named(e));
                }
            }
            let learned: Vec<_> = done
                .iter()
                .zip(keys.iter().zip(tickets))
                .filter_map(|((_, wrote), (key, ticket))| {
                    wrote
                        .as_ref()
                        .map(|w| ((*key).to_owned(), w.version, w.row.clone(), ticket))
                })
                .collect();
            let (hot, core) = (self.hot.clone(), self.core.clone());
            tx.after_commit(Box::new(move || {
                let _all = (learned.len() > 1).then(|| hot.exclusive());
                for (key, version, row, ticket) in learned {
                    hot.learn(&key, version, row, ticket, &core.budget);
                }
            }));
            claim.park(tx);
            return Ok(done);
        }
        Err(OpError::Unavailable(
            "the write kept conflicting with concurrent writes; retry".into(),
        ))
    }

    /// One key's read-modify-write inside `tx`, counting its statistics
    /// in the row `shard` of `larder_counts`.
    async fn write_key<T>(
        &self,
        tx: &impl GenericClient,
        key: &str,
        shard: i32,
        op: &mut (impl FnMut(Option<&Row>, Clock) -> Result<(Step, T), StoreError> + Send),
    ) -> Result<(T, Option<Wrote>), Fail> {
        let lock = tx.prepare_cached(LOCK_ROW).await?;
        let locked = tx.query_opt(&lock, &[&self.id, &key]).await?;
        let stored = locked.as_ref().map(|r| self.row(r)).transpose()?;
        let clock = self.clock();
        let live = stored.as_ref().filter(|r| !r.is_expired(clock.now));
        let (step, result) = op(live, clock)?;
        let before = stored.as_ref().map_or(0, Row::count) as i64;
        let after = step.count_after(stored.as_ref()) as i64;
        let Step {
            change,
            inserted,
            deleted,
        } = step;
        if after > before {
            self.make_room(tx, after - before, key, shard, clock.now)
                .await?;
        }
        let delta = Delta {
            size: after - before,
            inserts: inserted as i64,
            deletes: deleted as i64,
            expired: i64::from(stored.is_some() && live.is_none()),
            evicted: 0,
        };
        let now = clock.now as i64;
        let (event, event_value) = change.event(live);
        let event_text = event_value.map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let wrote = match change {
            Change::Keep => return Ok((result, None)),
            Change::Put {
                objects,
                expires_at,
            } => {
                let text = rows::encode(&objects);
                let count = objects.count() as i32;
                let statement = tx
                    .prepare_cached(if stored.is_some() {
                        UPDATE_ROW
                    } else {
                        INSERT_ROW
                    })
                    .await?;
                let version: i64 = tx
                    .query_one(
                        &statement,
                        &[
                            &self.id,
                            &key,
                            &text,
                            &count,
                            &(expires_at as i64),
                            &now,
                            &shard,
                            &delta.size,
                            &delta.inserts,
                            &delta.deletes,
                            &delta.expired,
                            &event,
                            &event_text,
                        ],
                    )
                    .await?
                    .get(0);
                let version = version as u64;
                Wrote {
                    version,
                    row: Some(Row {
                        objects,
                        version,
                        expires_at,
                        modified: crate::store::unix_seconds(now.max(0) as u64),
                    }),
                }
            }
            Change::Remove => {
                let version = self.delete_row(tx, key, shard, now, &delta, event).await?;
                Wrote { version, row: None }
            }
        };
        Ok((result, Some(wrote)))
    }

    async fn delete_row(
        &self,
        tx: &impl GenericClient,
        key: &str,
        shard: i32,
        now: i64,
        delta: &Delta,
        event: i16,
    ) -> Result<u64, Fail> {
        let statement = tx.prepare_cached(DELETE_ROW).await?;
        let row = tx
            .query_one(
                &statement,
                &[
                    &self.id,
                    &key,
                    &now,
                    &shard,
                    &delta.size,
                    &delta.deletes,
                    &delta.expired,
                    &delta.evicted,
                    &event,
                ],
            )
            .await?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    /// Before a write that adds `growth` objects: enforces `max_entries`
    /// for the whole table, evicting least recently written keys of an
    /// `lru` table. Growth of one table is serialized by an advisory lock
    /// so that concurrent writers on different nodes cannot both take the
    /// last place.
    async fn make_room(
        &self,
        tx: &impl GenericClient,
        growth: i64,
        key: &str,
        shard: i32,
        now: u64,
    ) -> Result<(), Fail> {
        let Some(max) = self.meta.spec_max_entries() else {
            return Ok(());
        };
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&self.id])
            .await?;
        let size: i64 = tx
            .query_one(
                "SELECT COALESCE(sum(size), 0)::bigint FROM larder_counts WHERE table_id = $1",
                &[&self.id],
            )
            .await?
            .get(0);
        let over = size + growth - max as i64;
        if over <= 0 {
            return Ok(());
        }
        if self.meta.eviction() != Eviction::Lru {
            return Err(Fail::Api(OpError::TableFull(max)));
        }
        let victims = tx
            .query(
                "SELECT key, count, expires_at FROM larder_entries \
                 WHERE table_id = $1 AND key <> $2 ORDER BY touched_at, version LIMIT $3 \
                 FOR UPDATE SKIP LOCKED",
                &[&self.id, &key, &over],
            )
            .await?;
        let mut freed = 0i64;
        for v in victims {
            if freed >= over {
                break;
            }
            let victim: String = v.get(0);
            let count = i64::from(v.get::<_, i32>(1));
            let expires_at: i64 = v.get(2);
            let expired = expires_at > 0 && expires_at <= now as i64;
            let delta = Delta {
                size: -count,
                expired: i64::from(expired),
                evicted: i64::from(!expired),
                ..Delta::default()
            };
            let event = if expired { EVENT_EXPIRE } else { EVENT_EVICT };
            let version = self
                .delete_row(tx, &victim, shard, now as i64, &delta, event)
                .await?;
            self.hot.changed(&victim, version, &self.core.budget);
            freed += count;
        }
        Ok(())
    }
}

/// The `larder_counts` row a write of `keys` counts its statistics in: the
/// key's own for one key; for several, the first key's for all of them.
/// Statistics are sums, so any row will do, and one row per transaction
/// means two multi-key writes never lock count rows in opposite orders
/// (they would deadlock, and PostgreSQL breaks a deadlock only after
/// `deadlock_timeout`, a second by default).
fn txn_shard(keys: &[&str]) -> i32 {
    keys.first().map_or(0, |k| shard_of(k))
}
