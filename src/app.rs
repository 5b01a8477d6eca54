//! The application's lifecycle: build (bind and wire), run, stop in order.
//!
//! [`App::build`] binds the listener first, so port 0 works and tests learn
//! the real port from [`App::local_addr`] before serving. [`App::run_until_stopped`]
//! serves until the given future completes, then stops accepting, lets
//! in-flight requests finish, and returns.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use thiserror::Error;
use tokio::net::TcpListener;

use crate::api::{self, AppState, HttpOptions};
use crate::clock::{Clock, SystemClock};
use crate::config::Config;
use crate::store::Store;

/// Why the server could not start or stopped badly.
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
    /// The data directory could not be created or opened.
    #[error("cannot use data directory {}: {source}", path.display())]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("server error: {0}")]
    Serve(std::io::Error),
}

/// A bound, wired server, ready to run.
pub struct App {
    listener: TcpListener,
    router: Router,
    state: AppState,
    shutdown_timeout: Duration,
}

impl App {
    /// Opens the data directory, binds the listener and builds the router,
    /// with the system clock.
    ///
    /// # Errors
    /// [`AppError::Bind`], [`AppError::DataDir`].
    pub async fn build(config: Config) -> Result<App, AppError> {
        Self::build_with_clock(config, Arc::new(SystemClock)).await
    }

    /// Like [`App::build`], with an injected clock (tests move time by hand).
    ///
    /// # Errors
    /// [`AppError::Bind`], [`AppError::DataDir`].
    pub async fn build_with_clock(config: Config, clock: Arc<dyn Clock>) -> Result<App, AppError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| AppError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| AppError::Bind {
                addr: config.listen,
                source,
            })?;
        let state = AppState {
            store: Store::new(clock),
            ready: Arc::new(AtomicBool::new(false)),
        };
        let router = api::build(
            state.clone(),
            &HttpOptions {
                max_body_bytes: config.max_body_bytes,
            },
        );
        state.ready.store(true, Ordering::Release);
        Ok(App {
            listener,
            router,
            state,
            shutdown_timeout: Duration::from_secs(config.shutdown_timeout_secs),
        })
    }

    /// The address actually bound.
    ///
    /// # Errors
    /// The OS error if the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The store behind the server (for embedding and tests).
    pub fn store(&self) -> Store {
        self.state.store.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, waits for
    /// in-flight requests (up to the configured timeout) and returns.
    ///
    /// # Errors
    /// [`AppError::Serve`] if the listener fails.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), AppError> {
        let addr = self.local_addr().map_err(AppError::Serve)?;
        tracing::info!(%addr, "larder listening");
        let ready = self.state.ready.clone();
        let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
        let signal = async move {
            shutdown.await;
            tracing::info!("stop requested: draining in-flight requests");
            let _ = stopping_tx.send(());
        };
        let serve = axum::serve(self.listener, self.router).with_graceful_shutdown(signal);
        let timeout = self.shutdown_timeout;
        let drain = async move {
            let _ = stopping_rx.await;
            tokio::time::sleep(timeout).await;
        };
        tokio::select! {
            result = serve => result.map_err(AppError::Serve)?,
            () = drain => tracing::error!(?timeout, "in-flight requests did not finish in time; stopping anyway"),
        }
        ready.store(false, Ordering::Release);
        tracing::info!("larder stopped");
        Ok(())
    }
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
