//! The storage tier: [`Tables`], the one registry the API asks for tables.
//!
//! It owns the catalog across tiers (create, drop, list, redefine, find by
//! name), hands out [`TableHandle`]s that implement [`TableOps`] whatever
//! the tier, and keeps the tier-specific parts of what surrounds a table:
//! where idempotency records live ([`records`]), where a watch starts,
//! readiness and the tier's metrics. The API layer never learns which tier
//! a table lives in.
//!
//! Two tiers exist: the local one ([`LocalTable`]: this node's store with
//! sled write-back) and the cluster one (`crate::cluster`, PostgreSQL with
//! a hot copy). A third tier is one module implementing [`TableOps`], one
//! variant of [`TableHandle`] and one branch in each catalog method here.

mod handle;
mod local;
pub mod records;

use std::future::Future;
use std::sync::Arc;

pub use handle::TableHandle;
pub use local::{not_durable, LocalTable};

use crate::cluster::Cluster;
use crate::ops::{OpError, OpResult, TableOps};
use crate::persist::Durability;
use crate::store::{Expiry, Persistence, ScanRequest, Start, Store, Table, TableSpec, Value};
use crate::tasks::Tasks;

/// See [`Tables::settle_point`].
#[derive(Debug, Clone)]
pub struct SettlePoint(Option<Durability>);

impl SettlePoint {
    /// Waits until every change applied so far is as durable as the table
    /// promises (one group-commit ticket, shared with the table's
    /// writers); false when the round failed.
    pub async fn settled(&self) -> bool {
        match &self.0 {
            None => true,
            Some(d) => d.wait_durable(false).await.is_ok(),
        }
    }
}

/// Objects copied per insert when a staged table is moved into another
/// tier.
const COPY_BATCH: usize = 1000;

/// Every table this node can serve, whichever tier keeps it.
#[derive(Debug)]
pub struct Tables {
    store: Store,
    durability: Durability,
    cluster: Option<Cluster>,
    tasks: Tasks,
    max_tables: usize,
}

impl Tables {
    /// The registry of `store`'s tables made durable by `durability`, and
    /// of `cluster`'s tables when the server runs with one; the tiers'
    /// background work runs in `tasks`; at most `max_tables` local tables.
    pub fn new(
        store: Store,
        durability: Durability,
        cluster: Option<Cluster>,
        tasks: Tasks,
        max_tables: usize,
    ) -> Self {
        Tables {
            store,
            durability,
            cluster,
            tasks,
            max_tables,
        }
    }

    /// The supervisor of the tiers' background tasks (sweeping, history
    /// retirement, record purging, the cluster's follower and sweeper).
    pub fn tasks(&self) -> &Tasks {
        &self.tasks
    }

    /// This node's in-memory store (server-wide figures: memory, revision,
    /// sweeping).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The local durable tier (write-back, group commit, recovery).
    pub fn durability(&self) -> &Durability {
        &self.durability
    }

    /// The table named `name`.
    ///
    /// # Errors
    /// [`OpError::TableNotFound`]; [`OpError::Unavailable`] when only the
    /// cluster could say and cannot be reached.
    pub async fn find(&self, name: &str) -> OpResult<TableHandle<'_>> {
        match self.store.table(name) {
            Ok(table) => Ok(self.local(table)),
            Err(missing) => match &self.cluster {
                Some(cluster) => Ok(TableHandle::Cluster(Box::pin(cluster.table(name)).await?)),
                None => Err(missing.into()),
            },
        }
    }

    /// Every table, local and cluster, by name.
    pub fn all(&self) -> Vec<TableHandle<'_>> {
        let mut all: Vec<TableHandle<'_>> = self
            .store
            .tables()
            .into_iter()
            .map(|t| self.local(t))
            .collect();
        if let Some(cluster) = &self.cluster {
            all.extend(
                cluster
                    .tables()
                    .into_iter()
                    .filter(|t| self.store.table(t.name()).is_err())
                    .map(TableHandle::Cluster),
            );
        }
        all.sort_by(|a, b| a.meta().name().cmp(b.meta().name()));
        all
    }

    /// Creates a table in the tier its persistence names. A persistent
    /// table becomes visible only once its definition is durable, so no
    /// write to it is acknowledged earlier; the table limit is exact under
    /// concurrent creates.
    ///
    /// # Errors
    /// [`OpError::TableExists`], the store's table limit,
    /// [`OpError::InvalidArgument`] (a cluster table without a cluster),
    /// or [`OpError::Internal`] when the definition cannot be stored
    /// (nothing is created then).
    pub async fn create(&self, spec: TableSpec) -> OpResult<TableHandle<'_>> {
        if spec.settings.persistence == Persistence::Cluster {
            let Some(cluster) = &self.cluster else {
                return Err(OpError::InvalidArgument(
                    "persistence \"cluster\" needs the server to run with --cluster-url (env LARDER_CLUSTER_URL)".into(),
                ));
            };
            if self.store.table(&spec.name).is_ok() {
                return Err(OpError::TableExists(spec.name));
            }
            return Ok(TableHandle::Cluster(cluster.create_table(spec).await?));
        }
        self.adopt(self.store.detached_table(spec)?).await
    }

    /// Takes a local table made outside the catalog (see
    /// [`Store::adopt_table_with`]; an import fills one unseen) into it:
    /// durable definition first, then visible.
    ///
    /// # Errors
    /// As [`Self::create`].
    pub async fn adopt(&self, table: Arc<Table>) -> OpResult<TableHandle<'_>> {
        if let Some(cluster) = &self.cluster {
            if cluster.has_table(table.name()).await? {
                return Err(OpError::TableExists(table.name().to_owned()));
            }
        }
        let (store, durability) = (self.store.clone(), self.durability.clone());
        let limit = self.max_tables;
        let table = run_blocking(move || {
            store.adopt_table_with(table, limit, |t| {
                durability.create_table(t).map_err(storage_failed)
            })
        })
        .await?;
        // The persister plans its sleep from the tables it sees; this one is
        // visible only now.
        self.durability.table_added();
        Ok(self.local(table))
    }

    /// Makes a staged table (filled outside the catalog, as an import
    /// does) visible in the tier its persistence names: a local table is
    /// taken in as it is; a table of another tier is created there and
    /// filled from the staged one page by page, and dropped again if that
    /// fails. The staged table's memory is given back on failure.
    ///
    /// # Errors
    /// As [`Self::create`], and whatever the copy meets.
    pub async fn restore(&self, spec: TableSpec, staged: Arc<Table>) -> OpResult<TableHandle<'_>> {
        if spec.settings.persistence != Persistence::Cluster {
            return match self.adopt(staged.clone()).await {
                Ok(t) => Ok(t),
                Err(e) => {
                    // Nobody else will: give its memory back.
                    staged.clear();
                    Err(e)
                }
            };
        }
        let made = self.create(spec).await?;
        if let Err(e) = copy_into(&staged, &made).await {
            if let Err(undo) = self.drop_table(&made).await {
                tracing::warn!(error = %undo, "a failed copy left a table behind");
            }
            return Err(e);
        }
        Ok(made)
    }

    /// Drops `table`, and its data in its tier, unless it was dropped
    /// meanwhile. A table of the same name can be created only after this
    /// finished.
    ///
    /// # Errors
    /// [`OpError::TableNotFound`], or [`OpError::Internal`] when the disk
    /// data cannot be removed (the table then stays).
    pub async fn drop_table(&self, table: &TableHandle<'_>) -> OpResult<()> {
        let table = match (table, &self.cluster) {
            (TableHandle::Cluster(t), Some(cluster)) => return cluster.drop_table(t).await,
            (t, _) => t.meta().clone(),
        };
        let (store, durability) = (self.store.clone(), self.durability.clone());
        run_blocking(move || {
            store.drop_table_with(&table, |t| durability.drop_table(t).map_err(storage_failed))
        })
        .await
    }

    /// Changes a table's settings or owner with `apply` and stores the new
    /// definition where its tier keeps it, as one step that a concurrent
    /// drop cannot interleave with.
    ///
    /// # Errors
    /// [`OpError::TableNotFound`] when the table was dropped meanwhile,
    /// [`OpError::Internal`] or [`OpError::Unavailable`] when the write
    /// fails.
    pub async fn redefine(
        &self,
        table: &TableHandle<'_>,
        apply: impl FnOnce(&Table) + Send + 'static,
    ) -> OpResult<()> {
        if let (TableHandle::Cluster(t), Some(cluster)) = (table, &self.cluster) {
            return cluster.redefine_table(t, apply).await;
        }
        let (store, durability) = (self.store.clone(), self.durability.clone());
        let table = table.meta().clone();
        run_blocking(move || {
            store.redefine_table(&table, apply, |t| {
                durability.save_definition(t).map_err(storage_failed)
            })
        })
        .await
    }

    /// Where a change stream on `table` starts: `since` a revision, or now.
    ///
    /// # Errors
    /// The store's watch errors (a revision in the future, history
    /// limits), [`OpError::Unavailable`] while the cluster tier does not
    /// know where its change log stands.
    pub fn watch(&self, table: &TableHandle<'_>, since: Option<u64>) -> OpResult<Start> {
        match table {
            TableHandle::Local(t) => {
                let store = self.store.clone();
                Ok(t.meta().watch(since, move || store.revision())?)
            }
            TableHandle::Cluster(t) => t.watch(since),
        }
    }

    /// Runs `work`, which may write to several keys, so that its writes to
    /// `sync` tables wait for the disk once, together, at its end rather
    /// than once each. The second result says whether they became durable.
    pub async fn with_one_wait<F: Future>(&self, work: F) -> (F::Output, OpResult<()>) {
        let (out, owed) = crate::persist::deferring(work).await;
        let settled = match owed {
            Some(ticket) => self
                .durability
                .wait_ticket(ticket)
                .await
                .map_err(not_durable),
            None => Ok(()),
        };
        (out, settled)
    }

    /// Waits until every change applied in memory so far is as durable as
    /// its table promises.
    ///
    /// # Errors
    /// [`OpError::Unavailable`] (or [`OpError::StorageFull`]) when the
    /// round failed.
    pub async fn wait_durable(&self) -> OpResult<()> {
        self.durability
            .wait_durable(false)
            .await
            .map_err(not_durable)
    }

    /// What a reader of `table`'s changes waits on before it passes
    /// changes on: on a `sync` table, their being on disk; elsewhere,
    /// nothing.
    pub fn settle_point(&self, table: &TableHandle<'_>) -> SettlePoint {
        SettlePoint(
            (table.meta().persistence() == Persistence::Sync).then(|| self.durability.clone()),
        )
    }

    /// Each configured tier that lives on another machine, by name, and
    /// whether it can be reached now, for readiness probes. A node stays
    /// ready while one is unreachable: its local tables keep working.
    pub fn remote_tiers(&self) -> Vec<(&'static str, bool)> {
        self.cluster
            .iter()
            .map(|c| ("cluster", c.reachable()))
            .collect()
    }

    /// Appends the tiers' own metrics (beyond the store's and write-back's)
    /// in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        if let Some(cluster) = &self.cluster {
            cluster.render_metrics(out);
        }
    }

    fn local(&self, table: Arc<Table>) -> TableHandle<'_> {
        TableHandle::Local(LocalTable::new(table, &self.durability))
    }
}

/// Copies every live object of `from` into `to`, a page at a time,
/// keeping each object's deadline.
async fn copy_into(from: &Table, to: &TableHandle<'_>) -> OpResult<()> {
    let mut req = ScanRequest {
        limit: COPY_BATCH,
        ..ScanRequest::default()
    };
    loop {
        let page = from.scan(&req)?;
        let items: Vec<(String, Value, Expiry)> = page
            .items
            .into_iter()
            .zip(page.deadlines)
            .map(|((k, v), d)| (k.to_string(), v, Expiry::At(d)))
            .collect();
        if !items.is_empty() {
            to.insert_many(items).await?;
        }
        match page.next_cursor {
            Some(c) => req.cursor = Some(c),
            None => return Ok(()),
        }
    }
}

/// Runs blocking catalog or durable-tier work off the async workers.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> OpResult<T> + Send + 'static,
) -> OpResult<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| OpError::Internal(format!("blocking task: {e}")))?
}

/// The durable tier failed to store a definition.
fn storage_failed(e: crate::persist::PersistError) -> OpError {
    OpError::Internal(e.to_string())
}
