//! The admin listener (`--admin-listen`): `/healthz`, `/readyz` and
//! `/metrics` over plain HTTP on an address of their own, for probes and
//! scrapers that cannot present a token or a client certificate. Nothing
//! else is served there; `/metrics` shows every table, as the admin
//! principal would see it, since reaching this address is the credential.

use axum::extract::State;
use axum::response::Response;
use axum::routing::get;
use axum::Router;

use super::auth::Principal;
use super::error::ApiError;
use super::AppState;

/// The admin listener's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(super::service::healthz))
        .route("/readyz", get(super::service::readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::RouteNotFound })
        .with_state(state)
}

async fn metrics(State(state): State<AppState>) -> Response {
    super::metrics::render(&state, &Principal::anonymous())
}
