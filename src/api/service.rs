//! Service endpoints: liveness, readiness.

use std::sync::atomic::Ordering;

use super::direct::ApiRoutes;
use crate::api_routes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;

use super::respond;
use super::AppState;
use crate::api::error::{ApiError, ApiResult, ErrorBody};

/// Routes for the service endpoints.
pub fn router() -> ApiRoutes {
    ApiRoutes::new()
        .routes(api_routes!(healthz))
        .routes(api_routes!(readyz))
        .routes(api_routes!(noop))
}

/// Do nothing.
///
/// Answers 200 `{}` through the same middleware as every route and touches
/// no table: the ceiling the HTTP stack itself sets, against which the
/// benchmark reports every other operation.
#[utoipa::path(
    get,
    path = "/noop",
    tag = "service",
    responses((status = 200, description = "Nothing was done"))
)]
pub async fn noop() -> Response {
    respond::json(StatusCode::OK, b"{}".to_vec())
}

/// A service status.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "ok"}))]
pub struct Status {
    /// `ok` or `ready`.
    pub status: &'static str,
    /// Nodes of a cluster: `ok` or `unavailable` (PostgreSQL unreachable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<&'static str>,
}

/// Liveness.
///
/// 200 while the process runs; for orchestrators' liveness probes.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "service",
    responses((status = 200, description = "Alive", body = Status))
)]
pub async fn healthz() -> Response {
    respond::json(StatusCode::OK, br#"{"status":"ok"}"#.to_vec())
}

/// Readiness.
///
/// 200 once every persistent table is loaded and requests are served; 503
/// `unavailable` while starting or stopping. A node of a cluster also
/// says whether it reaches PostgreSQL: `{"status":"ready","cluster":"ok"}`,
/// or `"cluster":"unavailable"` while cluster tables answer 503 (local
/// tables keep working, so the node stays ready).
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "service",
    responses(
        (status = 200, description = "Ready", body = Status),
        (status = 503, description = "Starting or stopping", body = ErrorBody),
    )
)]
pub async fn readyz(State(state): State<AppState>) -> ApiResult<Response> {
    if !state.ready.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable("starting or stopping".into()));
    }
    // One member per remote tier, named after it, after "status".
    let mut body = String::from(r#"{"status":"ready""#);
    for (tier, reachable) in state.tables.remote_tiers() {
        let health = if reachable { "ok" } else { "unavailable" };
        body.push_str(&format!(r#","{tier}":"{health}""#));
    }
    body.push('}');
    Ok(respond::json(StatusCode::OK, body.into_bytes()))
}
