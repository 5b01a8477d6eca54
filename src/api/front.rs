//! The one middleware every routed request passes through: request id,
//! readiness gate, load shedding, timeout, authentication, metrics and
//! logging, in one service.
//!
//! They used to be seven layers. axum clones a route's whole layer stack for
//! every request, and each `from_fn` layer boxed its future and cloned the
//! state, so the stack cost more than everything a cache hit does. Here a
//! request costs one boxed future, one state pointer, one atomic pair for
//! the in-flight count, one histogram record and, only when the log level
//! asks for them, a span and a log line.
//!
//! # Order of checks
//! 1. `/v1` before recovery finished or after a stop began: 503.
//! 2. More than `--max-concurrent-requests` in flight: 503 with
//!    `Retry-After` (probes are exempt, so overload never looks like death).
//! 3. `/v1` and `/metrics` without a valid token: 401.
//! 4. The handler, abandoned with 503 after `--request-timeout-ms`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use tower::{Layer, Service};
use tracing::Level;

use super::AppState;
use crate::error::{ApiError, InternalDetail};

/// The request id header: kept from the request when the client sent one,
/// made from a per-process counter otherwise, and returned on the response.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Adds [`Front`] around a service.
#[derive(Debug, Clone)]
pub struct FrontLayer {
    /// The server's services.
    pub state: AppState,
    /// Log every request at `info` rather than `debug`.
    pub access_log: bool,
}

impl<S> Layer<S> for FrontLayer {
    type Service = Front<S>;

    fn layer(&self, inner: S) -> Front<S> {
        Front {
            inner,
            state: self.state.clone(),
            access_log: self.access_log,
        }
    }
}

/// The service [`FrontLayer`] makes. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct Front<S> {
    inner: S,
    state: AppState,
    access_log: bool,
}

impl<S> Service<Request> for Front<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The service that was polled ready serves this request; a clone
        // stays behind for the next.
        let ready = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, ready);
        let state = self.state.clone();
        let access_log = self.access_log;
        Box::pin(async move { Ok(serve(inner, state, access_log, req).await) })
    }
}

async fn serve<S>(mut inner: S, state: AppState, access_log: bool, mut req: Request) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    let started = Instant::now();
    let id = match req.headers().get(&REQUEST_ID) {
        Some(v) => v.clone(),
        None => HeaderValue::from(state.request_ids.fetch_add(1, Ordering::Relaxed) + 1),
    };
    let route = req.extensions().get::<MatchedPath>().cloned();
    let route_str = route.as_ref().map_or("unmatched", |r| r.as_str());
    let method = req.method().clone();
    let debug = tracing::enabled!(Level::DEBUG);
    let log = access_log || debug;

    let (mut resp, principal) = match admit(&state, &mut req, log) {
        Err(refused) => (refused.into_response(), None),
        Ok((_permit, principal)) => {
            let span = if debug {
                tracing::debug_span!(
                    "request",
                    method = %method,
                    route = route_str,
                    id = id.to_str().unwrap_or("-"),
                    principal = principal.as_deref().unwrap_or("-"),
                )
            } else {
                tracing::Span::none()
            };
            let timeout = state.limits.timeout;
            let resp = match super::idempotency::applies(&req) {
                None => run_with_deadline(&mut inner, req, timeout, &span).await,
                Some(key) => {
                    // A task of its own: if the client goes away, the write
                    // and its record still complete, so the key is neither
                    // left in flight nor applied again by the retry.
                    let state = state.clone();
                    let task = tokio::spawn(async move {
                        super::idempotency::serve(&state, req, key, |req| async move {
                            run_with_deadline(&mut inner, req, timeout, &span).await
                        })
                        .await
                    });
                    match task.await {
                        Ok(resp) => resp,
                        Err(e) => ApiError::Internal(format!("an idempotent write failed: {e}"))
                            .into_response(),
                    }
                }
            };
            (resp, principal)
        }
    };

    let took = started.elapsed();
    let status = resp.status().as_u16();
    state
        .metrics
        .record_request(route_str, &method, status, took);
    if log || resp.extensions().get::<InternalDetail>().is_some() {
        log_request(&resp, access_log, route_str, &method, &id, principal, took);
    }
    resp.headers_mut().insert(REQUEST_ID.clone(), id);
    resp
}

/// The readiness gate, the in-flight limit and authentication. On success
/// returns the in-flight permit (if the route counts) and, when `keep_name`
/// (something will log it), the caller's name; the principal itself is left
/// in the request for the handler.
fn admit<'s>(
    state: &'s AppState,
    req: &mut Request,
    keep_name: bool,
) -> Result<(Option<super::InflightPermit<'s>>, Option<Arc<str>>), ApiError> {
    let path = req.uri().path();
    let api = path.starts_with("/v1/");
    if api && !state.ready.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable(
            "the server is starting or stopping".into(),
        ));
    }
    let probe = path == "/healthz" || path == "/readyz";
    let needs_auth = api || path == "/metrics";
    let permit = if probe {
        None
    } else {
        Some(state.limits.enter().ok_or_else(|| {
            ApiError::Unavailable("too many requests in flight; retry shortly".into())
        })?)
    };
    let mut name = None;
    match state
        .tokens
        .authenticate(req.headers().get(header::AUTHORIZATION))
    {
        Ok(who) => {
            if keep_name {
                name = Some(who.name.clone());
            }
            req.extensions_mut().insert(who);
        }
        Err(e) if needs_auth => return Err(e),
        Err(_) => {}
    }
    Ok((permit, name))
}

/// Runs the handler; after `timeout` it is dropped and answered 503. The
/// timer is armed only if the handler does not finish on its first poll, so
/// a request served from memory never touches the timer wheel.
async fn run_with_deadline<S>(
    inner: &mut S,
    req: Request,
    timeout: Duration,
    span: &tracing::Span,
) -> Response
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    let handler = {
        let _entered = span.enter();
        inner.call(req)
    };
    let mut handler = std::pin::pin!(handler);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        let _entered = span.enter();
        if let Poll::Ready(done) = handler.as_mut().poll(cx) {
            return Poll::Ready(match done {
                Ok(resp) => resp,
                Err(never) => match never {},
            });
        }
        let timer = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(
                ApiError::Unavailable("the request took too long and was abandoned".into())
                    .into_response(),
            ),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

fn log_request(
    resp: &Response,
    access_log: bool,
    route: &str,
    method: &axum::http::Method,
    id: &HeaderValue,
    principal: Option<Arc<str>>,
    took: Duration,
) {
    let status = resp.status().as_u16();
    let latency_us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
    let id = id.to_str().unwrap_or("-");
    let principal = principal.as_deref().unwrap_or("-");
    if let Some(InternalDetail(detail)) = resp.extensions().get::<InternalDetail>() {
        tracing::error!(%method, route, id, principal, status, latency_us, detail, "request failed");
    } else if access_log {
        tracing::info!(%method, route, id, principal, status, latency_us, "request");
    } else {
        tracing::debug!(%method, route, id, principal, status, latency_us, "request");
    }
}
