//! Cluster tables: tables kept in PostgreSQL and shared by every larder node
//! started with the same `--cluster-url`.
//!
//! This is the only module that knows about PostgreSQL. The rest of the
//! server sees a [`ClusterTable`] through [`TableOps`](crate::ops::TableOps),
//! like any local table.
//!
//! # What lives where
//! - PostgreSQL holds everything: definitions, rows, table-wide statistics
//!   and a change log (see `migrations/cluster/`). Every write is one
//!   transaction there, acknowledged after commit.
//! - Each node holds a bounded hot copy of recently used rows per table
//!   (`hot`), kept coherent by following the change log (`follow`).
//!   A read is served from it while the node has caught up with the log
//!   within the staleness bound; otherwise, and for `?consistent=true`,
//!   from PostgreSQL.
//! - One node at a time (the holder of an advisory lock) sweeps expired
//!   rows and prunes the log.

mod catalog;
pub mod claim;
mod follow;
mod hot;
pub mod rows;
mod schema;
pub mod sql;
mod table;
pub mod tls;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use thiserror::Error;
use tokio_postgres::error::SqlState;

pub use schema::SCHEMA_VERSION;
pub use table::ClusterTable;

use crate::clock::Clock;
use crate::histogram::Histogram;
use crate::ops::OpError;
use crate::store::{Counter, Store, TableSettings, TableSpec};
use crate::tasks::Tasks;
use hot::Budget;

/// The longest a connection may sit idle inside a transaction before
/// PostgreSQL ends it (a keyed write's transaction waits only for its
/// answer to be built).
const IDLE_IN_TRANSACTION: Duration = Duration::from_secs(10);

/// Settings of the cluster tier, from the configuration.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// `postgres://…` URL.
    pub url: String,
    /// Byte budget of the hot copies.
    pub cache_bytes: u64,
    /// How often to read the change log.
    pub poll: Duration,
    /// Longest a hot-copy read may lag another node's acknowledged write.
    pub staleness: Duration,
    /// Most connections to open.
    pub pool_size: usize,
    /// Longest to wait for a connection before answering 503.
    pub connect_timeout: Duration,
}

/// Why the cluster tier could not start.
#[derive(Debug, Error)]
pub enum ClusterError {
    /// The URL is not a PostgreSQL connection string.
    #[error("--cluster-url is not a valid PostgreSQL URL: {0}")]
    Url(String),
    /// PostgreSQL refused or failed.
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// No connection could be made (refused, timed out): worth retrying.
    #[error("PostgreSQL cannot be reached: {0}")]
    Unreachable(String),
    /// The database holds a schema newer than this build understands.
    #[error(
        "the cluster schema is version {found}, newer than this build's {known}; upgrade larder"
    )]
    TooNew {
        /// Version in the database.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
}

/// A PostgreSQL error as an operator needs to read it: the server's own
/// message and code, or the chain of causes (a TLS handshake's reason is
/// only in its source).
pub(crate) fn pg_text(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} {}: {}", db.severity(), db.code().code(), db.message());
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// What every cluster table of a node shares.
#[derive(Debug)]
pub(crate) struct Core {
    pool: Pool,
    clock: Arc<dyn Clock>,
    budget: Budget,
    staleness_ms: u64,
    /// Local Unix ms at which the last complete read of the change log
    /// started: the hot copies reflect every commit before it.
    synced_at: AtomicU64,
    /// Complete reads of the change log since this node started.
    polls: AtomicU64,
    /// Whether the last attempt to reach PostgreSQL succeeded.
    reachable: AtomicBool,
    /// Whether the schema has been checked and applied since this node
    /// started; until then no request touches the database.
    schema_ready: AtomicBool,
    /// Every change with a revision up to this has been told to watchers;
    /// 0 until the change log has been read far enough (see
    /// `follow::Events`).
    released: AtomicU64,
    /// Held while changes are told to watchers and while a watch starts.
    release_lock: std::sync::Mutex<()>,
    /// Reads answered from a hot copy.
    hot_hits: Counter,
    /// Reads that had to ask PostgreSQL.
    hot_misses: Counter,
    /// Round trips to PostgreSQL (whole transactions for writes).
    rtt: Histogram,
}

impl Core {
    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Whether the hot copies may answer reads at `now` (Unix ms).
    fn fresh(&self, now: u64) -> bool {
        let synced = self.synced_at.load(Ordering::Acquire);
        synced != 0 && now.saturating_sub(synced) <= self.staleness_ms
    }

    /// A pooled connection, or 503 when PostgreSQL cannot be reached or
    /// has not been reached since start.
    async fn client(&self) -> Result<deadpool_postgres::Object, OpError> {
        if !self.schema_ready.load(Ordering::Acquire) {
            return Err(OpError::Unavailable(
                "the cluster database has not been reached since this node started".into(),
            ));
        }
        match self.pool.get().await {
            Ok(c) => Ok(c),
            Err(e) => {
                self.reachable.store(false, Ordering::Release);
                Err(OpError::Unavailable(format!(
                    "the cluster database cannot be reached: {e}"
                )))
            }
        }
    }

    /// Records one round trip's duration.
    fn timed(&self, since: Instant) {
        self.rtt.record(since.elapsed());
    }
}

/// Maps a PostgreSQL error to the API's error.
pub(crate) fn db_error(e: &tokio_postgres::Error) -> OpError {
    match e.code() {
        Some(code) if *code == SqlState::FOREIGN_KEY_VIOLATION => {
            OpError::TableNotFound(String::new())
        }
        Some(code) if *code == SqlState::LOCK_NOT_AVAILABLE => {
            OpError::Unavailable("a row stayed locked by another write; retry".into())
        }
        Some(code) if *code == SqlState::QUERY_CANCELED => {
            OpError::Unavailable("the cluster database did not answer in time".into())
        }
        Some(code) if code.code().starts_with("08") || code.code().starts_with("57") => {
            OpError::Unavailable(format!("the cluster database is unavailable: {e}"))
        }
        Some(_) => OpError::Internal(format!("cluster database: {e}")),
        None => OpError::Unavailable(format!("the cluster database is unavailable: {e}")),
    }
}

/// Whether a transaction failed only because a concurrent one won a race
/// (a duplicate insert, a serialization failure or a deadlock), so running
/// it again will see the winner's result.
pub(crate) fn retryable(e: &tokio_postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::UNIQUE_VIOLATION
            || *c == SqlState::T_R_SERIALIZATION_FAILURE
            || *c == SqlState::T_R_DEADLOCK_DETECTED
    })
}

/// The cluster tier of a node: its connection pool, its cluster tables,
/// and the tasks that follow the change log and sweep. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct Cluster {
    core: Arc<Core>,
    /// Cluster tables by name.
    tables: Arc<DashMap<Box<str>, Arc<ClusterTable>>>,
    /// The same tables by id, for the change log.
    by_id: Arc<DashMap<i64, Arc<ClusterTable>>>,
    store: Store,
    config: Arc<ClusterConfig>,
    pg_config: Arc<tokio_postgres::Config>,
    /// TLS for every connection, as the URL's `sslmode` asks.
    tls: tls::Connector,
    /// Where the follower and sweeper run, stopped with the server's
    /// other background tasks.
    tasks: Tasks,
}

/// Table definition as `larder_tables` keeps it.
#[derive(Debug, Clone)]
struct Definition {
    id: i64,
    spec: TableSpec,
}

impl Cluster {
    /// Connects, applies the schema migrations, loads the cluster's tables
    /// and starts following the change log (in `tasks`).
    ///
    /// # Errors
    /// [`ClusterError`] when PostgreSQL cannot be reached or refuses the
    /// schema.
    pub async fn connect(
        config: ClusterConfig,
        store: Store,
        tasks: Tasks,
    ) -> Result<Self, ClusterError> {
        let (url, tls) = tls::split(&config.url)?;
        let mut pg_config: tokio_postgres::Config = url
            .parse()
            .map_err(|e: tokio_postgres::Error| ClusterError::Url(e.to_string()))?;
        pg_config.ssl_mode(tls.ssl_mode());
        let tls = tls.connector()?;
        let mut pg = pg_config.clone();
        pg.connect_timeout(config.connect_timeout);
        pg.application_name("larder");
        // A keyed write keeps its transaction open while its answer is
        // built (see `claim`). Should the node stop answering with one
        // open, PostgreSQL ends it rather than leave the key and rows
        // locked: after a silent connection is found dead (keepalives), or
        // after the transaction sat idle too long.
        pg.keepalives(true);
        pg.keepalives_idle(Duration::from_secs(15));
        let idle = format!(
            "-c idle_in_transaction_session_timeout={}",
            IDLE_IN_TRANSACTION.as_millis()
        );
        let options = match pg.get_options() {
            Some(given) if !given.is_empty() => format!("{given} {idle}"),
            _ => idle,
        };
        pg.options(&options);
        let manager = Manager::from_config(
            pg,
            tls.0.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(config.connect_timeout))
            .create_timeout(Some(config.connect_timeout))
            .recycle_timeout(Some(config.connect_timeout))
            .build()
            .map_err(|e| ClusterError::Postgres(e.to_string()))?;
        let core = Arc::new(Core {
            pool,
            clock: store.clock().clone(),
            budget: Budget::new(config.cache_bytes),
            staleness_ms: config.staleness.as_millis() as u64,
            synced_at: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            reachable: AtomicBool::new(false),
            schema_ready: AtomicBool::new(false),
            released: AtomicU64::new(0),
            release_lock: std::sync::Mutex::new(()),
            hot_hits: Counter::default(),
            hot_misses: Counter::default(),
            rtt: Histogram::default(),
        });
        let cluster = Cluster {
            core,
            tables: Arc::new(DashMap::new()),
            by_id: Arc::new(DashMap::new()),
            store,
            tasks,
            config: Arc::new(config),
            pg_config: Arc::new(pg_config),
            tls,
        };
        match cluster.start().await {
            Ok(()) => {}
            Err(ClusterError::Unreachable(why)) => {
                tracing::warn!(
                    error = %why,
                    "the cluster database cannot be reached; local tables are served, \
                     cluster tables answer 503 until it can"
                );
                cluster
                    .tasks
                    .spawn("cluster start", cluster.clone().start_later());
            }
            Err(e) => return Err(e),
        }
        Ok(cluster)
    }

    /// Applies the schema, loads the tables and starts following the
    /// change log and sweeping.
    async fn start(&self) -> Result<(), ClusterError> {
        let mut client = self.core.pool.get().await.map_err(|e| match &e {
            deadpool_postgres::PoolError::Backend(pg) if pg.code().is_some() => {
                ClusterError::Postgres(pg_text(pg))
            }
            deadpool_postgres::PoolError::Backend(pg) => ClusterError::Unreachable(pg_text(pg)),
            _ => ClusterError::Unreachable(e.to_string()),
        })?;
        schema::migrate(&mut client).await?;
        drop(client);
        self.core.schema_ready.store(true, Ordering::Release);
        self.core.reachable.store(true, Ordering::Release);
        let position = self
            .start_position()
            .await
            .map_err(|e| ClusterError::Postgres(e.to_string()))?;
        self.reload_catalog()
            .await
            .map_err(|e| ClusterError::Postgres(e.to_string()))?;
        self.tasks
            .spawn("cluster follower", follow::follow(self.clone(), position));
        self.tasks
            .spawn("cluster sweeper", follow::sweep(self.clone()));
        Ok(())
    }

    /// Retries `start` until it succeeds (or finds a reason never to).
    async fn start_later(self) {
        let mut wait = Duration::from_millis(100);
        loop {
            tokio::time::sleep(wait).await;
            match self.start().await {
                Ok(()) => {
                    tracing::info!("cluster database reached; cluster tables are served");
                    return;
                }
                Err(ClusterError::Unreachable(_)) => {}
                Err(ClusterError::TooNew { found, known }) => {
                    tracing::error!(
                        found,
                        known,
                        "the cluster schema is newer than this build; cluster tables stay unavailable"
                    );
                    return;
                }
                Err(e) => {
                    // Reached but failed part way: the schema may be in
                    // place, so requests may use the database; keep trying
                    // to load the tables.
                    tracing::warn!(error = %e, "starting the cluster tier failed; retrying");
                    self.core.schema_ready.store(false, Ordering::Release);
                }
            }
            wait = (wait * 2).min(Duration::from_secs(2));
        }
    }

    /// The cluster table named `name`, asking PostgreSQL when this node
    /// does not know it yet (it may have been created on another node a
    /// moment ago).
    ///
    /// # Errors
    /// [`OpError::TableNotFound`], or [`OpError::Unavailable`].
    pub async fn table(&self, name: &str) -> Result<Arc<ClusterTable>, OpError> {
        if let Some(t) = self.tables.get(name) {
            return Ok(t.clone());
        }
        match self.load_definition_by_name(name).await? {
            Some(def) => self.register(def),
            None => Err(OpError::TableNotFound(name.to_owned())),
        }
    }

    /// Whether a cluster table of this name exists (for the one namespace
    /// of table names).
    ///
    /// # Errors
    /// [`OpError::Unavailable`] when PostgreSQL cannot say.
    pub async fn has_table(&self, name: &str) -> Result<bool, OpError> {
        Ok(self.tables.contains_key(name) || self.load_definition_by_name(name).await?.is_some())
    }

    /// Every cluster table this node knows, by name.
    pub fn tables(&self) -> Vec<Arc<ClusterTable>> {
        let mut all: Vec<_> = self.tables.iter().map(|t| t.clone()).collect();
        all.sort_by(|a, b| a.name().cmp(b.name()));
        all
    }

    /// The idempotency record stored under `id`, if it has not expired.
    ///
    /// # Errors
    /// [`OpError::Unavailable`] when PostgreSQL cannot say.
    pub async fn load_record(&self, id: &str) -> Result<Option<String>, OpError> {
        let client = self.core.client().await?;
        let row = client
            .query_opt(
                "SELECT record FROM larder_idempotency WHERE id = $1 AND expires_at >= $2",
                &[&id, &(self.core.now_ms() as i64)],
            )
            .await
            .map_err(|e| db_error(&e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Stores an idempotency record until `expires_at` (Unix ms); committed
    /// when this returns.
    ///
    /// # Errors
    /// [`OpError::Unavailable`] when PostgreSQL cannot be reached.
    pub async fn save_record(
        &self,
        id: &str,
        record: &str,
        expires_at: u64,
    ) -> Result<(), OpError> {
        let client = self.core.client().await?;
        client
            .execute(
                "INSERT INTO larder_idempotency (id, record, expires_at) VALUES ($1, $2, $3) \
                 ON CONFLICT (id) DO UPDATE SET record = EXCLUDED.record, expires_at = EXCLUDED.expires_at",
                &[&id, &record, &(expires_at as i64)],
            )
            .await
            .map_err(|e| db_error(&e))?;
        Ok(())
    }

    /// Whether the last attempt to reach PostgreSQL succeeded.
    pub fn reachable(&self) -> bool {
        self.core.reachable.load(Ordering::Acquire)
    }

    /// Prometheus lines of the cluster tier.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let lag = match self.core.synced_at.load(Ordering::Acquire) {
            0 => f64::NAN,
            at => self.core.now_ms().saturating_sub(at) as f64 / 1000.0,
        };
        let _ = write!(
            out,
            "# HELP larder_cluster_log_lag_seconds How far this node's view of the cluster change log is behind now.\n\
             # TYPE larder_cluster_log_lag_seconds gauge\n\
             larder_cluster_log_lag_seconds {lag}\n\
             # HELP larder_cluster_log_polls_total Complete reads of the cluster change log.\n\
             # TYPE larder_cluster_log_polls_total counter\n\
             larder_cluster_log_polls_total {}\n\
             # HELP larder_cluster_hot_reads_total Cluster-table reads by where they were answered.\n\
             # TYPE larder_cluster_hot_reads_total counter\n\
             larder_cluster_hot_reads_total{{result=\"hit\"}} {}\n\
             larder_cluster_hot_reads_total{{result=\"miss\"}} {}\n\
             # HELP larder_cluster_hot_bytes Bytes held by this node's hot copies of cluster tables.\n\
             # TYPE larder_cluster_hot_bytes gauge\n\
             larder_cluster_hot_bytes {}\n\
             # HELP larder_cluster_reachable Whether PostgreSQL answered the last attempt (1) or not (0).\n\
             # TYPE larder_cluster_reachable gauge\n\
             larder_cluster_reachable {}\n\
             # HELP larder_cluster_db_roundtrip_seconds Time of one request's work in PostgreSQL (a statement, or a write's whole transaction).\n\
             # TYPE larder_cluster_db_roundtrip_seconds histogram\n",
            self.core.polls.load(Ordering::Relaxed),
            self.core.hot_hits.load(Ordering::Relaxed),
            self.core.hot_misses.load(Ordering::Relaxed),
            self.core.budget.used.load(Ordering::Relaxed).max(0),
            u8::from(self.reachable()),
        );
        self.core
            .rtt
            .render(out, "larder_cluster_db_roundtrip_seconds", "");
    }
}
