//! The one service every request passes through before the router:
//! request id, readiness gate, load shedding, authentication, timeout,
//! unread-body draining, metrics and logging.
//!
//! It wraps the whole router once, rather than being added to each route
//! with `Router::layer`. A layer on the routes turns every handler into a
//! boxed service that axum clones (two allocations with their frees) each
//! time it is called, and the matched route is only known inside. Here a
//! request costs one boxed future, one pointer clone, one atomic pair for
//! the in-flight count, one histogram record and, only when the log level
//! asks for them, a span and a log line. The route label for metrics and
//! logs comes from [`RouteLabels`], a matcher built from the same route list
//! as the router.
//!
//! The caller's [`Principal`] reaches handlers through a task-local (see
//! [`caller`](super::scope::caller)), not the request's extensions, whose
//! first entry would allocate a map and a box for every request.
//!
//! # Order of checks
//! 1. `/v1` before recovery finished or after a stop began: 503.
//! 2. More than `--max-concurrent-requests` in flight: 503 with
//!    `Retry-After` (probes are exempt, so overload never looks like death).
//! 3. `/v1` and `/metrics` without a valid token: 401.
//! 4. A read-only token on a `/v1` route that writes or manages: 403.
//! 5. A `/v1` caller past its rate limit (`--rate-limit`): 429 with
//!    `Retry-After`; an admitted caller's answer carries its
//!    `RateLimit-*` headers.
//! 6. A declared `Content-Length` over the route's body limit: 413.
//!
//! An answer from 1 to 6 comes before any of the body is read; a
//! connection with a body on its way is then closed, not drained.
//! 7. The handler, under the request's deadline (see `with_deadline`):
//!    408 for a body that has not arrived in time, 503 for a read that ran
//!    out of time; a write whose body is in is never abandoned.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use futures_util::future::Either;
use tower::Service;
use tracing::Level;

use super::auth::Principal;
use super::direct::{DirectTable, Served};
use super::rate::{RateState, Verdict};
use super::routes::{RouteClass, RouteLabels};
use super::scope::{Scope, SCOPE};
use super::AppState;
use crate::api::error::{ApiError, InternalDetail};
use crate::net::tls::ClientName;
use crate::net::PeerAddr;

/// The request id header: kept from the request when the client sent one,
/// made from a per-process counter otherwise, and returned on the response.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What [`Front`] shares between requests.
#[derive(Debug)]
struct Shared {
    state: AppState,
    access_log: bool,
    max_body_bytes: usize,
    routes: RouteLabels,
    direct: DirectTable,
}

/// The service in front of the router. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct Front<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Front<S> {
    /// Puts `inner` (the router) behind the front. `routes` labels
    /// requests; `direct` holds the handlers called without the router.
    pub fn new(
        inner: S,
        state: AppState,
        routes: RouteLabels,
        direct: DirectTable,
        access_log: bool,
        max_body_bytes: usize,
    ) -> Self {
        Front {
            inner,
            shared: Arc::new(Shared {
                state,
                access_log,
                max_body_bytes,
                routes,
                direct,
            }),
        }
    }
}

/// Holds a request's place in the in-flight count, and the shared state
/// the rest of the request needs.
struct Admitted {
    shared: Arc<Shared>,
    counted: bool,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if self.counted {
            self.shared.state.limits.leave();
        }
    }
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
        let started = Instant::now();
        let shared = self.shared.clone();
        let state = &shared.state;
        let id = match req.headers().get(&REQUEST_ID) {
            Some(v) => v.clone(),
            None => super::respond::number_header(
                state.request_ids.fetch_add(1, Ordering::Relaxed) + 1,
                false,
            ),
        };
        let route_index = shared.routes.find(req.uri().path());
        let method = req.method().clone();
        let class = shared.routes.class(route_index, &method);
        let debug = tracing::enabled!(Level::DEBUG);
        let log = shared.access_log || debug;

        let (req, watched) = super::drain::watch(req);
        let admitted = admit(&shared, &req, class).and_then(|admitted| {
            let limit = shared.state.limits.body_limit(class);
            match watched.as_ref().and_then(|w| w.declared()) {
                Some(declared) if declared > limit as u64 => {
                    if admitted.counted {
                        shared.state.limits.leave();
                    }
                    Err(ApiError::PayloadTooLarge(limit))
                }
                _ => Ok(admitted),
            }
        });
        let mut rate = None;
        let (counted, principal, served) = match admitted {
            Err(refused) => {
                // Refused before the body was read: it is never read, and
                // a connection with a body on its way is closed rather
                // than drained (so no `100 Continue` is sent either).
                drop(req);
                let mut answer = refused.into_response();
                if watched.is_some() {
                    close_after(&mut answer);
                }
                (false, None, Either::Left(std::future::ready(answer)))
            }
            Ok(Let {
                counted,
                principal,
                rate: limited,
            }) => {
                rate = limited;
                let name = log
                    .then(|| principal.as_ref().map(|p| p.name.clone()))
                    .flatten();
                let body = watched.as_ref().map(super::drain::Watched::progress);
                let request = Admission {
                    route_index,
                    class,
                    principal,
                    deadline: started + state.limits.timeout,
                    body,
                };
                let served = self.serve(req, request, &id, &method, debug);
                (counted, name, Either::Right(served))
            }
        };
        let admitted = Admitted { shared, counted };
        Box::pin(async move {
            let mut resp = served.await;
            if let Some(rate) = rate {
                rate.write_headers(resp.headers_mut());
            }
            let shared = &admitted.shared;
            if let Some(watched) = watched {
                super::drain::finish(watched, &mut resp, shared.max_body_bytes).await;
            }
            let resp = finish(
                shared,
                resp,
                Finished {
                    route_index,
                    route: shared.routes.name(route_index),
                    method: &method,
                    id,
                    principal,
                    started,
                    log,
                },
            );
            drop(admitted);
            Ok(resp)
        })
    }
}

/// Marks an answer as the last on its connection.
fn close_after(resp: &mut Response) {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
}

/// What is known of an admitted request before its handler runs.
struct Admission {
    route_index: u16,
    class: RouteClass,
    principal: Option<Principal>,
    deadline: Instant,
    /// How far its body has been read; `None` when it has none.
    body: Option<super::drain::Progress>,
}

impl<S> Front<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// Hands an admitted request to its handler, under its deadline and
    /// with its caller in reach of the handler.
    fn serve(
        &mut self,
        req: Request,
        request: Admission,
        id: &HeaderValue,
        method: &Method,
        debug: bool,
    ) -> impl Future<Output = Response> + Send + 'static {
        let route_index = request.route_index;
        let route = self.shared.routes.name(route_index);
        let span = if debug {
            tracing::debug_span!(
                "request",
                method = %method,
                route,
                id = id.to_str().unwrap_or("-"),
                principal = request.principal.as_ref().map_or("-", |p| &*p.name),
            )
        } else {
            tracing::Span::none()
        };
        let limits = Deadline {
            at: request.deadline,
            body: request.body,
            changes: request.class.changes(),
            bounded: !request.class.import,
        };
        let scope = Scope {
            caller: Cell::new(request.principal),
            deadline: request.deadline,
            stop_at: crate::pace::stop_before(request.deadline, self.shared.state.limits.timeout),
            memory: self.shared.state.tables.store().memory().clone(),
        };
        let long = request.class.long.then_some(request.deadline);
        let Some(key) = super::idempotency::applies(&req, request.class) else {
            let handler = {
                let _entered = span.enter();
                match long {
                    None => dispatch(&self.shared, &mut self.inner, route_index, req),
                    Some(deadline) => {
                        dispatch_long(&self.shared, &self.inner, route_index, req, deadline)
                    }
                }
            };
            // Not boxed: the caller keeps it inside its own future.
            return Either::Left(SCOPE.scope(scope, with_deadline(handler, limits, span)));
        };
        // A task of its own: if the client goes away, the write and its
        // record still complete, so the key is neither left in flight nor
        // applied again by the retry. Its body is read under the same
        // deadline as any other.
        let mut inner = self.inner.clone();
        let shared = self.shared.clone();
        let who = scope.caller.take().map(|p| {
            let name = p.name.clone();
            scope.caller.set(Some(p));
            name
        });
        // Boxed: the task is moved into the runtime by pointer, not by its
        // (large) state.
        let task = tokio::spawn(Box::pin(SCOPE.scope(scope, async move {
            let served = super::idempotency::serve(&shared.state, req, who, key, |req| {
                let _entered = span.enter();
                match long {
                    None => dispatch(&shared, &mut inner, route_index, req),
                    Some(deadline) => dispatch_long(&shared, &inner, route_index, req, deadline),
                }
            });
            with_deadline(served, limits, tracing::Span::none()).await
        })));
        Either::Right(async move {
            match task.await {
                Ok(resp) => resp,
                Err(e) => {
                    ApiError::Internal(format!("an idempotent write failed: {e}")).into_response()
                }
            }
        })
    }
}

/// Calls the handler of `route_index` for the request's method directly
/// when the table has one, and the router otherwise.
fn dispatch<S>(shared: &Shared, inner: &mut S, route_index: u16, req: Request) -> Served
where
    S: Service<Request, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    if let Some(handler) = shared.direct.get(route_index, req.method()) {
        return handler(req, shared.state.clone());
    }
    let routed = inner.call(req);
    Box::pin(async move {
        match routed.await {
            Ok(resp) => resp,
            Err(never) => match never {},
        }
    })
}

/// [`dispatch`] for long work: first waits for a slot of
/// `--max-long-requests` (503 when none comes free by `deadline`), held
/// until the answer's body is sent whole (an export streams long after
/// its handler returned).
fn dispatch_long<S>(
    shared: &Arc<Shared>,
    inner: &S,
    route_index: u16,
    req: Request,
    deadline: Instant,
) -> Served
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    let shared = shared.clone();
    let mut inner = inner.clone();
    Box::pin(async move {
        let slot = match shared.state.limits.long_slot(deadline).await {
            Ok(slot) => slot,
            Err(e) => return e.into_response(),
        };
        let resp = dispatch(&shared, &mut inner, route_index, req).await;
        resp.map(|body| axum::body::Body::new(crate::net::Guarded::new(body, slot)))
    })
}

/// What is known of a request when its answer is ready.
struct Finished<'a> {
    route_index: u16,
    route: &'a str,
    method: &'a Method,
    id: HeaderValue,
    principal: Option<Arc<str>>,
    started: Instant,
    log: bool,
}

/// Records the request in metrics, logs it when asked (or when it failed
/// inside), and stamps the request id on the answer.
fn finish(shared: &Shared, mut resp: Response, f: Finished<'_>) -> Response {
    let took = f.started.elapsed();
    let status = resp.status().as_u16();
    shared
        .state
        .metrics
        .record_request(f.route_index, f.route, f.method, status, took);
    if f.log || resp.extensions().get::<InternalDetail>().is_some() {
        log_request(
            &resp,
            shared.access_log,
            f.route,
            f.method,
            &f.id,
            f.principal,
            took,
        );
    }
    if *f.method == Method::HEAD {
        head_answer(&mut resp);
    }
    resp.headers_mut().insert(REQUEST_ID.clone(), f.id);
    resp
}

/// A HEAD answer keeps the length its body would have had and sends no
/// body. The router does this for the routes it serves; handlers called
/// directly get it here (on a router answer it changes nothing).
fn head_answer(resp: &mut Response) {
    use axum::body::HttpBody;
    if !resp.headers().contains_key(header::CONTENT_LENGTH) {
        if let Some(len) = resp.body().size_hint().exact() {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
    }
    *resp.body_mut() = axum::body::Body::empty();
}

/// The readiness gate, the in-flight limit and authentication. On success
/// returns whether the request was counted in flight (probes are not) and
/// the caller, if it authenticated.
/// A request let in: whether it counts against the in-flight limit, who
/// sent it, and the rate-limit headers its answer carries.
struct Let {
    counted: bool,
    principal: Option<Principal>,
    rate: Option<RateState>,
}

fn admit(shared: &Shared, req: &Request, class: RouteClass) -> Result<Let, ApiError> {
    let state = &shared.state;
    let path = req.uri().path();
    let api = path.starts_with("/v1/");
    if api && !state.ready.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable(
            "the server is starting or stopping".into(),
        ));
    }
    let probe = path == "/healthz" || path == "/readyz";
    if !probe && !state.limits.try_enter() {
        return Err(ApiError::Unavailable(
            "too many requests in flight; retry shortly".into(),
        ));
    }
    let counted = !probe;
    let bearer = req.headers().get(header::AUTHORIZATION);
    let decide = |who: Result<&Principal, ApiError>| decide(shared, req, class, counted, who);
    match req.extensions().get::<ClientName>() {
        Some(client) => decide(
            state
                .tokens
                .authenticate_client(bearer, client)
                .as_ref()
                .map_err(Clone::clone),
        ),
        None => state.tokens.with_caller(bearer, decide),
    }
}

/// What becomes of a request once its caller is known (or known to be
/// nobody): the read-only and rate-limit checks, on `/v1` routes.
fn decide(
    shared: &Shared,
    req: &Request,
    class: RouteClass,
    counted: bool,
    who: Result<&Principal, ApiError>,
) -> Result<Let, ApiError> {
    let state = &shared.state;
    let path = req.uri().path();
    let api = path.starts_with("/v1/");
    let needs_auth = api || path == "/metrics";
    let leave = || {
        if counted {
            state.limits.leave();
        }
    };
    match who {
        // A read-only token may use reads only (API.md's read, write and
        // manage classes), whatever the table's access allows.
        Ok(who) if who.read_only && api && class.changes() => {
            leave();
            Err(ApiError::Forbidden(format!(
                "the token of principal '{}' is read-only",
                who.name
            )))
        }
        // Limited after authentication (a 401 costs nobody anything) and
        // after the in-flight check (a shed request costs no tokens).
        Ok(who) if api => {
            let peer = || req.extensions().get::<PeerAddr>().map(|p| p.0);
            match state.rates.check(&who.name, who.rate, peer()) {
                Verdict::Unlimited => Ok(Let {
                    counted,
                    principal: Some(who.clone()),
                    rate: None,
                }),
                Verdict::Allowed(rate) => Ok(Let {
                    counted,
                    principal: Some(who.clone()),
                    rate: Some(rate),
                }),
                Verdict::Refused {
                    state: rate,
                    retry_after_secs,
                } => {
                    leave();
                    Err(ApiError::RateLimited(rate, retry_after_secs))
                }
            }
        }
        Ok(who) => Ok(Let {
            counted,
            principal: Some(who.clone()),
            rate: None,
        }),
        Err(e) if needs_auth => {
            leave();
            Err(e)
        }
        Err(_) => Ok(Let {
            counted,
            principal: None,
            rate: None,
        }),
    }
}

/// What a request's deadline does when it passes.
struct Deadline {
    at: Instant,
    /// How far the body has been read (`None`: no body).
    body: Option<super::drain::Progress>,
    /// The request may change data: once its body is in, its handler is
    /// never abandoned.
    changes: bool,
    /// False for imports, which streams of any length feed: they are
    /// bounded by their own limits, not the deadline.
    bounded: bool,
}

/// Runs the handler under its deadline. When the deadline passes: a body
/// still on its way gets 408 and the connection closes (nothing was
/// applied, since no handler acts before its body is in); a write or
/// manage request whose body is in is never abandoned, and answers late
/// if it must (it may have begun to apply); a read is dropped and answered
/// 503 (long reads stop before the deadline by themselves). The timer is
/// armed only if the handler does not finish on its first poll, so a
/// request served from memory never touches the timer wheel.
async fn with_deadline<F>(handler: F, deadline: Deadline, span: tracing::Span) -> Response
where
    F: Future<Output = Response>,
{
    let mut handler = std::pin::pin!(handler);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    let mut patient = !deadline.bounded;
    std::future::poll_fn(|cx| {
        let _entered = span.enter();
        if let Poll::Ready(resp) = handler.as_mut().poll(cx) {
            return Poll::Ready(resp);
        }
        if patient {
            return Poll::Pending;
        }
        let timer = timer.get_or_insert_with(|| {
            Box::pin(tokio::time::sleep_until(tokio::time::Instant::from_std(
                deadline.at,
            )))
        });
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if deadline.body.as_ref().is_some_and(|b| !b.complete()) {
            let mut resp = ApiError::RequestTimeout.into_response();
            close_after(&mut resp);
            return Poll::Ready(resp);
        }
        if deadline.changes {
            patient = true;
            return Poll::Pending;
        }
        Poll::Ready(
            ApiError::Unavailable("the request took too long and was abandoned".into())
                .into_response(),
        )
    })
    .await
}

fn log_request(
    resp: &Response,
    access_log: bool,
    route: &str,
    method: &Method,
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
