//! The HTTP layer: routes, extractors, middleware and the OpenAPI document.
//!
//! One module per resource, each with a `router()` whose handlers carry their
//! OpenAPI annotations; [`build`] merges them into one axum router and the
//! spec it serves. Handlers validate input fully before calling the store, so
//! a failed request changes nothing.

pub mod admin;
pub mod auth;
pub mod counters;
pub mod direct;
pub mod drain;
pub mod entries;
pub mod error;
pub mod extract;
pub mod front;
pub mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod origin;
pub mod rate;
pub mod raw;
pub mod respond;
pub mod routes;
pub mod scope;
pub mod select;
pub mod service;
pub mod tables;
pub mod tokens;
pub mod transfer;
pub mod txn;
pub mod watch;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::api::error::ApiError;
use crate::ops::TableOps;
use crate::tables::{TableHandle, Tables};

/// What every handler can reach. Cloning copies one pointer: axum clones
/// the state for every layer and handler of every request, so it must cost
/// one atomic increment, not one per field.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    /// Wraps the server's services.
    pub fn new(services: Services) -> Self {
        AppState(Arc::new(services))
    }
}

impl std::ops::Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The server's services, shared by every request through [`AppState`].
#[derive(Debug)]
pub struct Services {
    /// Every table, whichever tier keeps it.
    pub tables: Tables,
    /// Set once recovery is done; cleared when a stop begins. Gates `/v1`.
    pub ready: Arc<AtomicBool>,
    /// Request and write-back metrics.
    pub metrics: metrics::Metrics,
    /// Read-through fetching.
    pub origins: origin::Origins,
    /// Configured bearer tokens; empty when authentication is off.
    pub tokens: Arc<tokens::TokenStore>,
    /// Per-principal (and per-address) rate limits.
    pub rates: rate::RateLimits,
    /// Request limits.
    pub limits: Limits,
    /// Last request id handed out (ids count up from 1 per process).
    pub request_ids: AtomicU64,
    /// Remembered answers of writes sent with `Idempotency-Key`.
    pub idempotency: idempotency::Idempotency,
    /// The open client connections, for `/metrics`.
    pub connections: Arc<crate::net::Connections>,
    /// The admin listener's connections, when there is one (for
    /// `/metrics`).
    pub admin_connections: Option<Arc<crate::net::Connections>>,
    /// The listener's TLS, when it speaks HTTPS (reloaded on `SIGHUP`).
    pub tls: Option<Arc<crate::net::tls::Tls>>,
}

/// Limits on requests, from the configuration.
#[derive(Debug)]
pub struct Limits {
    /// Requests in flight now.
    inflight: AtomicUsize,
    /// Most requests in flight; past it new ones are shed with 503.
    max_inflight: usize,
    /// Longest a request may take.
    pub timeout: Duration,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most objects one select request examines.
    pub max_select_scan: usize,
    /// Largest import stream accepted, in bytes.
    pub max_import_bytes: usize,
    /// Longest a change stream stays silent before it sends a comment.
    pub watch_heartbeat: Duration,
    /// Slots for long work (scans, selects, exports, imports).
    long: Arc<tokio::sync::Semaphore>,
    /// How many slots `long` has.
    max_long: usize,
    /// Long requests sent away with 503 after waiting for a slot.
    long_shed: AtomicU64,
    /// Largest select or scan page, in bytes.
    pub max_response_bytes: usize,
}

impl Limits {
    /// Limits of `max_concurrent` requests, `timeout` each, and bodies of
    /// at most `max_body_bytes`. (The table limit is the registry's:
    /// [`crate::tables::Tables::new`].)
    pub fn new(max_concurrent: usize, timeout: Duration, max_body_bytes: usize) -> Self {
        Limits {
            inflight: AtomicUsize::new(0),
            max_inflight: max_concurrent.max(1),
            timeout,
            max_body_bytes,
            max_select_scan: 1_000_000,
            max_import_bytes: 1 << 30,
            watch_heartbeat: Duration::from_secs(15),
            long: Arc::new(tokio::sync::Semaphore::new(default_long_slots())),
            max_long: default_long_slots(),
            long_shed: AtomicU64::new(0),
            max_response_bytes: 8 << 20,
        }
    }

    /// The same limits with `n` slots for long work.
    pub fn with_max_long_requests(self, n: usize) -> Self {
        let n = n.max(1);
        Limits {
            long: Arc::new(tokio::sync::Semaphore::new(n)),
            max_long: n,
            ..self
        }
    }

    /// The same limits with select and scan pages of at most `n` bytes.
    pub fn with_max_response_bytes(self, n: usize) -> Self {
        Limits {
            max_response_bytes: n.max(4096),
            ..self
        }
    }

    /// Waits for a slot of long work until `deadline`.
    ///
    /// # Errors
    /// [`ApiError::Unavailable`] when none came free in time.
    pub async fn long_slot(
        &self,
        deadline: std::time::Instant,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        let wait = self.long.clone().acquire_owned();
        match tokio::time::timeout_at(tokio::time::Instant::from_std(deadline), wait).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => {
                self.long_shed.fetch_add(1, Ordering::Relaxed);
                Err(ApiError::Unavailable(format!(
                    "{} scans, selects, exports or imports are running (--max-long-requests); retry shortly",
                    self.max_long
                )))
            }
        }
    }

    /// Long requests running now, the slots, and how many were sent away.
    pub fn long_stats(&self) -> (usize, usize, u64) {
        let running = self.max_long - self.long.available_permits().min(self.max_long);
        (
            running,
            self.max_long,
            self.long_shed.load(Ordering::Relaxed),
        )
    }

    /// The same limits with change streams sending a comment after `d`
    /// of silence.
    pub fn with_watch_heartbeat(self, d: Duration) -> Self {
        Limits {
            watch_heartbeat: d.max(Duration::from_millis(1)),
            ..self
        }
    }

    /// The same limits with selects examining at most `n` objects each.
    pub fn with_max_select_scan(self, n: usize) -> Self {
        Limits {
            max_select_scan: n.max(1),
            ..self
        }
    }

    /// The same limits with imports of at most `n` bytes.
    pub fn with_max_import_bytes(self, n: usize) -> Self {
        Limits {
            max_import_bytes: n,
            ..self
        }
    }

    /// Counts a request in flight; false (and not counted) when the limit
    /// is reached.
    pub fn try_enter(&self) -> bool {
        let was = self.inflight.fetch_add(1, Ordering::AcqRel);
        if was < self.max_inflight {
            return true;
        }
        self.leave();
        false
    }

    /// The largest body a request of `class` may send.
    pub fn body_limit(&self, class: routes::RouteClass) -> usize {
        if class.import {
            self.max_import_bytes
        } else {
            self.max_body_bytes
        }
    }

    /// Counts a request admitted by [`Limits::try_enter`] out.
    pub fn leave(&self) {
        self.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Services {
    /// The table named `name`, if `who` may perform `op` on it.
    ///
    /// # Errors
    /// [`ApiError::TableNotFound`], [`ApiError::Forbidden`].
    pub async fn table_for(
        &self,
        name: &str,
        who: &auth::Principal,
        op: auth::Op,
    ) -> Result<TableHandle<'_>, ApiError> {
        let handle = self.tables.find(name).await?;
        auth::authorize(handle.meta(), who, op)?;
        Ok(handle)
    }
}

/// The default of `--max-long-requests`: one per core.
pub fn default_long_slots() -> usize {
    std::thread::available_parallelism().map_or(2, std::num::NonZero::get)
}

/// Options of the HTTP layer.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// Largest body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Log every request at `info` rather than `debug`.
    pub access_log: bool,
}

/// The spec of every route, as [`build`] serves it at `/openapi.json`.
pub fn openapi() -> utoipa::openapi::OpenApi {
    openapi::finish(api_routes().split().0.split_for_parts().1)
}

fn api_routes() -> direct::ApiRoutes {
    direct::ApiRoutes::with_openapi(openapi::ApiDoc::openapi())
        .merge(tables::router())
        .merge(entries::router())
        .merge(counters::router())
        .merge(select::router())
        .merge(txn::router())
        .merge(transfer::router())
        .merge(watch::router())
        .merge(service::router())
        .merge(metrics::router())
}

/// The complete service: API routes, `/openapi.json`, Swagger UI at
/// `/docs` and JSON fallbacks, behind [`front::Front`], which every request
/// passes through, even one no route matched.
pub fn build(state: AppState, opts: &HttpOptions) -> front::Front<Router> {
    let (api, handlers) = api_routes().split();
    let (api, spec) = api.split_for_parts();
    let spec = openapi::finish(spec);
    let routes = route_labels(&spec);
    let direct = direct::DirectTable::new(handlers, |pattern| routes.index_of(pattern));
    let router = api
        .merge(SwaggerUi::new("/docs").url("/openapi.json", spec))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state.clone());
    front::Front::new(
        router,
        state,
        routes,
        direct,
        opts.access_log,
        opts.max_body_bytes,
    )
}

/// Labels for every route [`build`] serves: the documented paths of `spec`
/// and the docs.
pub(crate) fn route_labels(spec: &utoipa::openapi::OpenApi) -> routes::RouteLabels {
    let documented = spec.paths.paths.keys().map(String::as_str);
    routes::RouteLabels::new(documented.chain([
        "/openapi.json",
        "/docs",
        "/docs/",
        "/docs/{*rest}",
    ]))
}

#[cfg(test)]
mod tests {
    use axum::http::Method;

    use super::*;

    /// A documented operation left out of the direct table would still be
    /// served (by the router), only slower: nothing else would notice.
    #[test]
    fn every_documented_operation_is_called_directly() {
        let (api, handlers) = api_routes().split();
        let spec = openapi::finish(api.split_for_parts().1);
        let routes = route_labels(&spec);
        let direct = direct::DirectTable::new(handlers, |pattern| routes.index_of(pattern));
        let mut operations = 0;
        for (path, item) in &spec.paths.paths {
            let item = serde_json::to_value(item).expect("a path item serializes");
            let route = routes
                .index_of(path)
                .expect("every documented path has a route index");
            for method in [
                Method::GET,
                Method::HEAD,
                Method::POST,
                Method::PUT,
                Method::DELETE,
                Method::PATCH,
            ] {
                if item.get(method.as_str().to_ascii_lowercase()).is_some() {
                    operations += 1;
                    assert!(
                        direct.get(route, &method).is_some(),
                        "{method} {path} is not called directly"
                    );
                }
            }
        }
        assert!(operations > 30, "only {operations} operations documented");
        assert_eq!(
            direct.len(),
            operations,
            "the direct table holds handlers the spec does not document"
        );
    }
}
