//! The HTTP layer: routes, extractors, middleware and the OpenAPI document.
//!
//! One module per resource, each with a `router()` whose handlers carry their
//! OpenAPI annotations; [`build`] merges them into one axum router and the
//! spec it serves. Handlers validate input fully before calling the store, so
//! a failed request changes nothing.

pub mod auth;
pub mod counters;
pub mod drain;
pub mod entries;
pub mod extract;
pub mod metrics;
pub mod openapi;
pub mod origin;
pub mod respond;
pub mod service;
pub mod tables;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Router};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use tracing::Span;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_swagger_ui::SwaggerUi;

use crate::error::{ApiError, InternalDetail};
use crate::persist::Durability;
use crate::store::{Persistence, Store, Table, TableSpec};
use extract::BodyLimit;

/// What every handler can reach. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The tables.
    pub store: Store,
    /// Set once recovery is done; cleared when a stop begins. Gates `/v1`.
    pub ready: Arc<AtomicBool>,
    /// The durable tier.
    pub durability: Durability,
    /// Request and write-back metrics.
    pub metrics: metrics::Metrics,
    /// Read-through fetching.
    pub origins: origin::Origins,
    /// Configured bearer tokens; empty when authentication is off.
    pub tokens: Arc<auth::Tokens>,
    /// Request limits.
    pub limits: Arc<Limits>,
}

/// Limits on requests, from the configuration.
#[derive(Debug)]
pub struct Limits {
    /// Permits for requests in flight; none left means shed with 503.
    pub inflight: Arc<tokio::sync::Semaphore>,
    /// Longest a request may take.
    pub timeout: Duration,
    /// Most tables that may exist.
    pub max_tables: usize,
}

impl Limits {
    /// Limits of `max_concurrent` requests, `timeout` each, `max_tables`.
    pub fn new(max_concurrent: usize, timeout: Duration, max_tables: usize) -> Self {
        Limits {
            inflight: Arc::new(tokio::sync::Semaphore::new(max_concurrent.max(1))),
            timeout,
            max_tables,
        }
    }
}

impl AppState {
    /// The table named `name`, if `who` may perform `op` on it.
    ///
    /// # Errors
    /// [`ApiError::TableNotFound`], [`ApiError::Forbidden`].
    pub fn table_for(
        &self,
        name: &str,
        who: &auth::Principal,
        op: auth::Op,
    ) -> Result<Arc<Table>, ApiError> {
        let table = self.store.table(name)?;
        auth::authorize(&table, who, op)?;
        Ok(table)
    }

    /// Returns once a change just applied to `table` is as durable as the
    /// table promises: at once for `none` and `periodic`, after an fsync for
    /// `sync` (shared with concurrent writers).
    ///
    /// # Errors
    /// [`ApiError::Unavailable`] when the write-back round failed.
    pub async fn durable(&self, table: &Table) -> Result<(), ApiError> {
        if table.persistence() != Persistence::Sync {
            return Ok(());
        }
        self.durability
            .wait_durable(false)
            .await
            .map_err(|e| ApiError::Unavailable(format!("could not make the write durable: {e}")))
    }

    /// Creates a table. A persistent table becomes visible only once its
    /// definition is on disk, so no write to it is acknowledged earlier;
    /// the table limit is exact under concurrent creates.
    ///
    /// # Errors
    /// [`ApiError::TableExists`], [`ApiError::TableLimit`],
    /// [`ApiError::InvalidArgument`], or [`ApiError::Internal`] when the
    /// definition cannot be stored (nothing is created then).
    pub async fn create_table(&self, spec: TableSpec) -> Result<Arc<Table>, ApiError> {
        let store = self.store.clone();
        let durability = self.durability.clone();
        let limit = self.limits.max_tables;
        let table = run_blocking(move || {
            store.create_table_with(spec, limit, |t| {
                if t.persistence() == Persistence::None {
                    return Ok(());
                }
                durability.create_table(t).map_err(storage_failed)
            })
        })
        .await?;
        if table.persistence() != Persistence::None {
            self.durability.table_added();
        }
        Ok(table)
    }

    /// Drops `table`, and its data on disk, unless it was dropped meanwhile.
    /// A table of the same name can be created only after this finished.
    ///
    /// # Errors
    /// [`ApiError::TableNotFound`], or [`ApiError::Internal`] when the disk
    /// data cannot be removed (the table then stays).
    pub async fn drop_table(&self, table: Arc<Table>) -> Result<(), ApiError> {
        let store = self.store.clone();
        let durability = self.durability.clone();
        run_blocking(move || {
            store.drop_table_with(&table, |t| {
                if t.persistence() == Persistence::None {
                    return Ok(());
                }
                durability.drop_table(t.name()).map_err(storage_failed)
            })
        })
        .await
    }

    /// Changes a table's settings or owner with `apply` and stores the new
    /// definition of a persistent table, as one step that a concurrent drop
    /// cannot interleave with.
    ///
    /// # Errors
    /// [`ApiError::TableNotFound`] when the table was dropped meanwhile,
    /// [`ApiError::Internal`] when the write fails.
    pub async fn redefine_table(
        &self,
        table: &Arc<Table>,
        apply: impl FnOnce(&Table) + Send + 'static,
    ) -> Result<(), ApiError> {
        let store = self.store.clone();
        let durability = self.durability.clone();
        let table = table.clone();
        run_blocking(move || {
            store.redefine_table(&table, apply, |t| {
                if t.persistence() == Persistence::None {
                    return Ok(());
                }
                durability.save_definition(t).map_err(storage_failed)
            })
        })
        .await
    }
}

/// Runs blocking catalog or durable-tier work off the async workers.
async fn run_blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("blocking task: {e}")))?
}

/// The durable tier failed to store a definition.
fn storage_failed(e: crate::persist::PersistError) -> ApiError {
    ApiError::Internal(e.to_string())
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
    openapi::finish(api_router().split_for_parts().1)
}

fn api_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(tables::router())
        .merge(entries::router())
        .merge(counters::router())
        .merge(service::router())
        .merge(metrics::router())
}

/// The complete router: API routes, `/openapi.json`, Swagger UI at `/docs`,
/// JSON fallbacks, and the middleware stack.
pub fn build(state: AppState, opts: &HttpOptions) -> Router {
    let access_log = opts.access_log;
    let (api, spec) = api_router().split_for_parts();
    let spec = openapi::finish(spec);
    let request_id = HeaderName::from_static("x-request-id");
    api.merge(SwaggerUi::new("/docs").url("/openapi.json", spec))
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            readiness_gate,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            shed_and_time_out,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(DefaultBodyLimit::max(opts.max_body_bytes))
        .layer(Extension(BodyLimit(opts.max_body_bytes)))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let route = req
                        .extensions()
                        .get::<MatchedPath>()
                        .map(|p| p.as_str().to_owned())
                        .unwrap_or_default();
                    let id = req
                        .extensions()
                        .get::<RequestId>()
                        .and_then(|id| id.header_value().to_str().ok())
                        .unwrap_or("-")
                        .to_owned();
                    tracing::debug_span!(
                        "request",
                        method = %req.method(),
                        route,
                        id,
                        principal = tracing::field::Empty
                    )
                })
                .on_response(move |resp: &Response, latency: Duration, _span: &Span| {
                    let status = resp.status().as_u16();
                    let latency_us = latency.as_micros() as u64;
                    if let Some(InternalDetail(detail)) = resp.extensions().get::<InternalDetail>()
                    {
                        tracing::error!(status, latency_us, detail, "request failed");
                    } else if access_log {
                        tracing::info!(status, latency_us, "request");
                    } else {
                        tracing::debug!(status, latency_us, "request");
                    }
                }),
        )
        .layer(SetRequestIdLayer::new(
            request_id,
            CountingRequestId::default(),
        ))
        .layer(drain::DrainLayer {
            limit: opts.max_body_bytes,
        })
        .with_state(state)
}

/// Answers 503 on `/v1` until the store is recovered and after a stop begins.
async fn readiness_gate(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if req.uri().path().starts_with("/v1/") && !state.ready.load(Ordering::Acquire) {
        return ApiError::Unavailable("the server is starting or stopping".into()).into_response();
    }
    next.run(req).await
}

/// Sheds requests past the concurrency limit with 503 and `Retry-After`,
/// and answers 503 for requests that run past the timeout. Liveness and
/// readiness probes are exempt, so overload never looks like death.
async fn shed_and_time_out(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path == "/readyz" {
        return next.run(req).await;
    }
    let Ok(_permit) = state.limits.inflight.clone().try_acquire_owned() else {
        return ApiError::Unavailable("too many requests in flight; retry shortly".into())
            .into_response();
    };
    match tokio::time::timeout(state.limits.timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::Unavailable("the request took too long and was abandoned".into())
            .into_response(),
    }
}

/// Request ids: a per-process sequence, cheap and unique within a log.
#[derive(Debug, Clone, Default)]
struct CountingRequestId(Arc<AtomicU64>);

impl MakeRequestId for CountingRequestId {
    fn make_request_id<B>(&mut self, _req: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        HeaderValue::from_str(&n.to_string())
            .ok()
            .map(RequestId::new)
    }
}
