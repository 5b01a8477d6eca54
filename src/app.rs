//! The application's lifecycle: build (open, bind, wire), run, stop in order.
//!
//! [`App::build`] opens the data directory (refusing one it cannot use) and
//! binds the listener, so port 0 works and tests learn the real port from
//! [`App::local_addr`] before serving. [`App::run_until_stopped`] serves at
//! once, answering 503 on `/v1` and `/readyz` while persistent tables load,
//! then reports ready. When the stop future completes it stops accepting,
//! lets in-flight requests finish, writes every dirty object and fsyncs.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::net::{ConnLimits, Connections, Server};
use crate::store::HistoryLimits;

use crate::api::{self, AppState, HttpOptions};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::persist::Durability;
pub use crate::persist::EngineWrapper;
use crate::store::Store;
use crate::tables::Tables;
use crate::tasks::Tasks;

/// Why the server could not start, or did not stop cleanly.
#[derive(Debug, Error)]
pub enum AppError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The data directory cannot be used.
    #[error("cannot use data directory {}: {cause}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why, in a few words.
        cause: String,
    },
    /// Serving failed.
    #[error("server error: {0}")]
    Serve(std::io::Error),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
    /// The cluster database cannot be used.
    #[error("cluster: {0}")]
    Cluster(String),
    /// Writing dirty data at shutdown failed.
    #[error("could not write all data at shutdown: {0}")]
    Shutdown(String),
}

/// Parts of a server that an embedder or a test may replace.
#[derive(Default)]
pub struct Parts {
    /// Where time comes from; the system clock when `None`.
    pub clock: Option<Arc<dyn Clock>>,
    /// Wraps the sled engine; tests prove fsync ordering through it.
    pub wrap_engine: Option<EngineWrapper>,
}

/// A bound, wired server, ready to run.
pub struct App {
    server: Server,
    /// The admin listener (`--admin-listen`), if any.
    admin: Option<Server>,
    router: api::front::Front<Router>,
    state: AppState,
    shutdown_timeout: Duration,
    run_sweeper: bool,
    /// How long a table keeps its watch history without watchers.
    watch_retention: Duration,
    /// How often expired idempotency answers are purged.
    idempotency_purge: Duration,
}

impl App {
    /// Opens the data directory, binds the listener and builds the router,
    /// with the system clock.
    ///
    /// # Errors
    /// [`AppError::Bind`], [`AppError::DataDir`].
    pub async fn build(config: Config) -> Result<App, AppError> {
        Self::build_with(config, Parts::default()).await
    }

    /// Like [`App::build`], with an injected clock (tests move time by hand).
    ///
    /// # Errors
    /// [`AppError::Bind`], [`AppError::DataDir`].
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<App, AppError> {
        let parts = Parts {
            clock: Some(clock),
            ..Parts::default()
        };
        Self::build_with(config, parts).await
    }

    /// Like [`App::build`], with some parts replaced.
    ///
    /// # Errors
    /// [`AppError::Bind`], [`AppError::DataDir`].
    pub async fn build_with(config: Config, parts: Parts) -> Result<App, AppError> {
        let clock = parts.clock.unwrap_or_else(|| Arc::new(SystemClock));
        let tokens = crate::api::tokens::TokenStore::load(
            config.tokens_file.as_deref(),
            config.tokens.as_deref(),
            &config.admin_principal,
        )
        .map_err(AppError::Config)?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(Arc::new(
                crate::net::tls::Tls::load(crate::net::tls::TlsFiles {
                    cert: cert.clone(),
                    key: key.clone(),
                    client_ca: config.tls_client_ca.clone(),
                })
                .map_err(|e| AppError::Config(format!("TLS: {e}")))?,
            )),
            (None, None) if config.tls_client_ca.is_some() => {
                return Err(AppError::Config(
                    "--tls-client-ca needs --tls-cert and --tls-key".into(),
                ))
            }
            (None, None) => None,
            _ => {
                return Err(AppError::Config(
                    "--tls-cert and --tls-key go together".into(),
                ))
            }
        };
        // Client certificates authenticate callers as well as tokens do.
        let authenticated = tokens.enabled() || tls.as_ref().is_some_and(|t| t.mutual());
        if !authenticated && !config.listen.ip().is_loopback() && !config.allow_insecure_public {
            return Err(AppError::Config(format!(
                "refusing to listen on {} with authentication off: configure --tokens-file or LARDER_TOKENS, or pass --allow-insecure-public",
                config.listen
            )));
        }
        if config.cluster_url.is_some() && config.cluster_staleness_ms <= config.cluster_poll_ms {
            return Err(AppError::Config(format!(
                "--cluster-staleness-ms ({}) must exceed --cluster-poll-ms ({})",
                config.cluster_staleness_ms, config.cluster_poll_ms
            )));
        }
        let store = Store::new(clock);
        store.set_memory_limit(config.max_memory_bytes);
        let dir = config.data_dir.clone();
        let opened = {
            let store = store.clone();
            let wrap = parts.wrap_engine;
            let cache = config.sled_cache_bytes;
            tokio::task::spawn_blocking(move || Durability::open_with(&dir, store, wrap, cache))
                .await
        };
        let durability = match opened {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                return Err(AppError::DataDir {
                    path: config.data_dir.clone(),
                    cause: e.to_string(),
                })
            }
            Err(e) => {
                return Err(AppError::DataDir {
                    path: config.data_dir.clone(),
                    cause: e.to_string(),
                })
            }
        };
        let tasks = Tasks::new();
        let cluster = match &config.cluster_url {
            Some(url) => Some(
                crate::cluster::Cluster::connect(
                    crate::cluster::ClusterConfig {
                        url: url.clone(),
                        cache_bytes: config.cluster_cache_bytes,
                        poll: Duration::from_millis(config.cluster_poll_ms.max(1)),
                        staleness: Duration::from_millis(config.cluster_staleness_ms),
                        pool_size: config.cluster_pool_size,
                        connect_timeout: Duration::from_millis(
                            config.request_timeout_ms.clamp(100, 5000),
                        ),
                    },
                    store.clone(),
                    tasks.clone(),
                )
                .await
                .map_err(|e| AppError::Cluster(e.to_string()))?,
            ),
            None => None,
        };
        if config.idle_timeout_ms < config.header_timeout_ms {
            return Err(AppError::Config(format!(
                "--idle-timeout-ms ({}) must be at least --header-timeout-ms ({})",
                config.idle_timeout_ms, config.header_timeout_ms
            )));
        }
        let fd_limit = crate::net::raise_fd_limit();
        let admin_connections = if config.admin_listen.is_some() {
            usize::try_from(config.admin_max_connections.max(1)).unwrap_or(usize::MAX)
        } else {
            0
        };
        let reserve =
            crate::net::FD_RESERVE + config.cluster_pool_size as u64 + admin_connections as u64;
        let wanted = usize::try_from(config.max_connections).unwrap_or(usize::MAX);
        let max_connections = crate::net::fd_budget(wanted, fd_limit, reserve);
        if max_connections < wanted {
            tracing::info!(
                max_connections,
                fd_limit,
                "--max-connections lowered to what the open-file limit allows"
            );
        }
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| AppError::Bind {
                addr: config.listen,
                source,
            })?;
        let admin = match config.admin_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .map_err(|source| AppError::Bind { addr, source })?;
                let conns = Arc::new(Connections::new(ConnLimits {
                    max_connections: admin_connections,
                    header_timeout: Duration::from_millis(config.header_timeout_ms),
                    idle_timeout: Duration::from_millis(config.idle_timeout_ms),
                }));
                Some(Server::new(
                    listener,
                    conns,
                    Duration::from_millis(config.write_stall_ms),
                ))
            }
            None => None,
        };
        let connections = Arc::new(Connections::new(ConnLimits {
            max_connections,
            header_timeout: Duration::from_millis(config.header_timeout_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
        }));
        let default_rate = match &config.rate_limit {
            Some(text) => Some(
                text.parse::<crate::api::rate::Rate>()
                    .map_err(|e| AppError::Config(format!("--rate-limit {e}")))?,
            ),
            None => None,
        };
        let limits_anyone = default_rate.is_some() || tokens.has_rates();
        let server = Server::new(
            listener,
            connections.clone(),
            Duration::from_millis(config.write_stall_ms),
        );
        // Anonymous callers are limited per address: requests then carry
        // it (one allocation each, so only when a limit may apply).
        let server = if limits_anyone {
            server.tagging_peers()
        } else {
            server
        };
        let server = match &tls {
            Some(tls) => server.with_tls(tls.clone()),
            None => server,
        };
        store.set_max_grouped_keys(usize::try_from(config.max_grouped_keys).unwrap_or(usize::MAX));
        store.set_max_stale(usize::try_from(config.max_stale_entries).unwrap_or(usize::MAX));
        store.set_watch_limits(HistoryLimits {
            max_events: usize::try_from(config.watch_history).unwrap_or(usize::MAX),
            max_bytes: usize::try_from(config.watch_history_bytes).unwrap_or(usize::MAX),
            idle_keep: Duration::from_millis(config.watch_history_retention_ms),
        });
        let metrics = crate::api::metrics::Metrics::new();
        durability.set_round_histogram(metrics.writeback_histogram());
        durability.set_fsync_histogram(metrics.fsync_histogram());
        durability
            .record_filter()
            .set_bytes(config.idempotency_filter_bytes);
        durability.record_index().set_max_entries(
            usize::try_from(config.idempotency_index_entries).unwrap_or(usize::MAX),
        );
        let memory = store.memory().clone();
        let origins = match &config.origin_ca {
            None => {
                crate::api::origin::Origins::new(config.origin_allow.clone(), config.max_body_bytes)
            }
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    AppError::Config(format!("--origin-ca {}: {e}", path.display()))
                })?;
                crate::api::origin::Origins::with_ca(
                    config.origin_allow.clone(),
                    config.max_body_bytes,
                    &pem,
                )
                .map_err(|e| AppError::Config(format!("--origin-ca {}: {e}", path.display())))?
            }
        }
        .with_limits(crate::api::origin::OriginLimits {
            max_inflight: usize::try_from(config.origin_max_inflight.max(1)).unwrap_or(usize::MAX),
            breaker_failures: config.origin_breaker_failures.max(1),
            breaker_ms: config.origin_breaker_ms,
        });
        let state = AppState::new(crate::api::Services {
            tables: Tables::new(store, durability, cluster, tasks, config.max_tables),
            ready: Arc::new(AtomicBool::new(false)),
            metrics,
            origins,
            tokens: Arc::new(tokens),
            rates: crate::api::rate::RateLimits::new(
                default_rate,
                usize::try_from(config.rate_limit_max_clients).unwrap_or(usize::MAX),
            ),
            limits: crate::api::Limits::new(
                config.max_concurrent_requests,
                Duration::from_millis(config.request_timeout_ms),
                config.max_body_bytes,
            )
            .with_max_select_scan(usize::try_from(config.max_select_scan).unwrap_or(usize::MAX))
            .with_max_import_bytes(usize::try_from(config.max_import_bytes).unwrap_or(usize::MAX))
            .with_watch_heartbeat(Duration::from_millis(config.watch_heartbeat_ms))
            .with_max_long_requests(
                config
                    .max_long_requests
                    .and_then(|n| usize::try_from(n).ok())
                    .unwrap_or_else(crate::api::default_long_slots),
            )
            .with_max_response_bytes(
                usize::try_from(config.max_response_bytes).unwrap_or(usize::MAX),
            ),
            request_ids: std::sync::atomic::AtomicU64::new(0),
            idempotency: crate::api::idempotency::Idempotency::new(
                config.idempotency_ttl_secs.saturating_mul(1000),
                usize::try_from(config.idempotency_max_bytes).unwrap_or(usize::MAX),
                memory,
            ),
            connections,
            admin_connections: admin.as_ref().map(|a| a.connections().clone()),
            tls,
        });
        let router = api::build(
            state.clone(),
            &HttpOptions {
                max_body_bytes: config.max_body_bytes,
                access_log: config.access_log,
            },
        );
        Ok(App {
            server,
            admin,
            router,
            state,
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_secs),
            run_sweeper: config.run_sweeper,
            watch_retention: Duration::from_millis(config.watch_history_retention_ms),
            idempotency_purge: Duration::from_millis(config.idempotency_purge_ms.max(1)),
        })
    }

    /// The address actually bound.
    ///
    /// # Errors
    /// The OS error if the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.server.local_addr()
    }

    /// The address the admin listener bound, if there is one.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().and_then(|s| s.local_addr().ok())
    }

    /// The store behind the server (for embedding and tests).
    pub fn store(&self) -> Store {
        self.state.tables.store().clone()
    }

    /// The durable tier behind the server (for embedding and tests).
    pub fn durability(&self) -> Durability {
        self.state.tables.durability().clone()
    }

    /// Serves until `shutdown` completes, then stops in order: stop
    /// accepting, finish in-flight requests (up to the configured timeout),
    /// write every dirty object, fsync.
    ///
    /// # Errors
    /// [`AppError::DataDir`] if stored tables cannot be loaded,
    /// [`AppError::Serve`] if the listener fails, [`AppError::Shutdown`] if the
    /// final write fails.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let addr = self.local_addr().map_err(AppError::Serve)?;
        let ready = self.state.ready.clone();
        let durability = self.state.tables.durability().clone();
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let ready_on_stop = ready.clone();
        let store_on_stop = self.state.tables.store().clone();
        let signal = async move {
            shutdown.await;
            ready_on_stop.store(false, Ordering::Release);
            // Change streams never end by themselves: end them, or the
            // drain below would wait for them until its timeout.
            store_on_stop.close_watches();
            tracing::info!("stop requested: draining in-flight requests");
            let _ = stopping_tx.send(());
        };
        let mut server = tokio::spawn(self.server.serve(self.router, signal));
        // Probes reach the admin listener from the start: /readyz answers
        // 503 there until recovery is done.
        if let Some(admin) = self.admin {
            let tasks = self.state.tables.tasks();
            let admin_addr = admin
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string());
            let routes = crate::api::admin::router(self.state.clone());
            tasks.spawn("admin listener", admin.serve(routes, tasks.stopping()));
            tracing::info!(addr = %admin_addr, "admin listening: /healthz, /readyz, /metrics");
        }
        tracing::info!(%addr, "larder listening; loading persistent tables");

        let recovered = {
            let d = durability.clone();
            tokio::task::spawn_blocking(move || d.recover()).await
        };
        let recovery_error = match recovered {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(cause) = recovery_error {
            server.abort();
            return Err(AppError::DataDir {
                path: durability.dir().to_owned(),
                cause,
            });
        }
        let now = self.state.tables.store().now_ms();
        match self.state.idempotency.load(&self.state.tables, now) {
            Ok(n) if n > 0 => tracing::info!(records = n, "idempotency records loaded"),
            Ok(_) => {}
            Err(e) => {
                server.abort();
                return Err(AppError::DataDir {
                    path: durability.dir().to_owned(),
                    cause: e.to_string(),
                });
            }
        }
        let persister = durability.start().map_err(AppError::Serve)?;
        let tasks = self.state.tables.tasks();
        reload_on_hangup(tasks, self.state.clone());
        {
            let state = self.state.clone();
            let purge_every = self.idempotency_purge;
            tasks.spawn("idempotency purger", async move {
                let mut tick = tokio::time::interval(purge_every);
                loop {
                    tick.tick().await;
                    // It walks every stored record: off the runtime.
                    let state = state.clone();
                    let purged = tokio::task::spawn_blocking(move || {
                        let now = state.tables.store().now_ms();
                        state.idempotency.purge(&state.tables, now);
                    })
                    .await;
                    if let Err(e) = purged {
                        tracing::error!(error = %e, "the idempotency purge failed");
                    }
                }
            });
        }
        // Frees the histories of tables nobody watches any more, within a
        // fifth of the retention time after it ends (at most a second).
        {
            let store = self.state.tables.store().clone();
            let every =
                (self.watch_retention / 5).clamp(Duration::from_millis(10), Duration::from_secs(1));
            tasks.spawn("watch history retirer", async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    store.retire_idle_watches();
                }
            });
        }
        if self.run_sweeper {
            let store = self.state.tables.store().clone();
            let stopping = tasks.stopping();
            tasks.spawn(
                "TTL sweeper",
                async move { store.run_sweeper(stopping).await },
            );
        }
        ready.store(true, Ordering::Release);
        tracing::info!(%addr, "larder ready");

        let timeout = self.shutdown_timeout;
        let drained = tokio::select! {
            joined = &mut server => Some(joined),
            () = async {
                let _ = stopping_rx.await;
                tokio::time::sleep(timeout).await;
            } => None,
        };
        match drained {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::error!(error = %e, "server task failed"),
            None => {
                tracing::error!(
                    ?timeout,
                    "in-flight requests did not finish in time; stopping anyway"
                );
                server.abort();
            }
        }
        ready.store(false, Ordering::Release);
        // Background work next: nothing may change a table once the last
        // round has begun.
        tasks.stop().await;
        let flushed =
            tokio::task::spawn_blocking(move || durability.shutdown(Some(persister))).await;
        match flushed {
            Ok(Ok(())) => {
                tracing::info!("larder stopped");
                Ok(())
            }
            Ok(Err(e)) => Err(AppError::Shutdown(e.to_string())),
            Err(e) => Err(AppError::Shutdown(e.to_string())),
        }
    }
}

/// Reloads the TLS pair and the tokens file on each `SIGHUP`, each on its
/// own, in a background task; without this the signal's default action
/// would end the process.
fn reload_on_hangup(tasks: &crate::tasks::Tasks, state: AppState) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP; tokens cannot be reloaded");
                return;
            }
        };
        tasks.spawn("reload on SIGHUP", async move {
            while hangups.recv().await.is_some() {
                state.origins.reload_env();
                if let Some(tls) = &state.tls {
                    match tls.reload() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificate and key reloaded"),
                        Err(e) => tracing::warn!(
                            error = %e,
                            "SIGHUP: TLS pair refused; the pair in force stays"
                        ),
                    }
                }
                if !state.tokens.reloads() {
                    continue;
                }
                match state.tokens.reload() {
                    Ok(n) => {
                        // Rates given on token lines may have changed.
                        state.rates.reset_principals();
                        tracing::info!(tokens = n, "SIGHUP: tokens file reloaded");
                    }
                    Err(e) => tracing::warn!(
                        error = %e,
                        "SIGHUP: tokens file refused; the tokens in force stay"
                    ),
                }
            }
        });
    }
    #[cfg(not(unix))]
    let _ = (tasks, state);
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
