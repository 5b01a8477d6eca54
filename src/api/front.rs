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
//! [`caller`]), not the request's extensions, whose first entry would
//! allocate a map and a box for every request.
//!
//! # Order of checks
//! 1. `/v1` before recovery finished or after a stop began: 503.
//! 2. More than `--max-concurrent-requests` in flight: 503 with
//!    `Retry-After` (probes are exempt, so overload never looks like death).
//! 3. `/v1` and `/metrics` without a valid token: 401.
//! 4. The handler, abandoned with 503 after `--request-timeout-ms`.

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
use tower::Service;
use tracing::Level;

use super::auth::Principal;
use super::direct::{DirectTable, Served};
use super::AppState;
use crate::error::{ApiError, InternalDetail};

/// The request id header: kept from the request when the client sent one,
/// made from a per-process counter otherwise, and returned on the response.
pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

tokio::task_local! {
    /// The caller of the request this task serves, until a handler takes it.
    static CALLER: Cell<Option<Principal>>;
}

/// Takes the caller of the request being served: `None` outside a request,
/// when authentication failed on a route that does not need it, or when it
/// was already taken.
pub fn caller() -> Option<Principal> {
    CALLER.try_with(Cell::take).ok().flatten()
}

/// Route patterns as the router knows them (`/v1/tables/{table}`), for
/// labelling metrics and logs.
#[derive(Debug)]
pub struct RouteLabels {
    matcher: matchit::Router<u16>,
    /// The routes with the [`ENTRY_ROUTE`] shape, by the static text after
    /// the key.
    entry_routes: Vec<(Box<str>, u16)>,
    /// Patterns by index; the last is `unmatched`.
    names: Vec<Box<str>>,
    /// The index of `unmatched`.
    unmatched: u16,
}

/// The label of a request that matched no route.
const UNMATCHED: &str = "unmatched";

/// The fixed parts of `/v1/tables/{table}/entries/{key}`, the pattern most
/// requests match (with or without a static tail after the key):
/// [`RouteLabels::find`] recognizes these without the general matcher.
const ENTRY_ROUTE: [&str; 2] = ["/v1/tables/", "/entries/"];

impl RouteLabels {
    /// A matcher of `patterns`, which use axum's syntax. A pattern the
    /// matcher refuses (a conflict) is left out: its requests are
    /// labelled `unmatched`.
    pub fn new<'a>(patterns: impl IntoIterator<Item = &'a str>) -> Self {
        let mut matcher = matchit::Router::new();
        let mut names: Vec<Box<str>> = Vec::new();
        let mut entry_routes = Vec::new();
        for pattern in patterns {
            let Ok(index) = u16::try_from(names.len()) else {
                break;
            };
            match matcher.insert(pattern, index) {
                Ok(()) => names.push(pattern.into()),
                Err(e) => {
                    tracing::warn!(pattern, error = %e, "route left out of metrics labels");
                    continue;
                }
            }
            let [tables, entries] = ENTRY_ROUTE;
            let tail = pattern
                .strip_prefix(tables)
                .and_then(|p| p.strip_prefix("{table}"))
                .and_then(|p| p.strip_prefix(entries))
                .and_then(|p| p.strip_prefix("{key}"));
            if let Some(tail) =
                tail.filter(|t| t.is_empty() || (t.starts_with('/') && !t.contains('{')))
            {
                entry_routes.push((tail.into(), index));
            }
        }
        // The loop stops while `names.len()` still fits in u16.
        let unmatched = u16::try_from(names.len()).unwrap_or(u16::MAX);
        names.push(UNMATCHED.into());
        RouteLabels {
            matcher,
            names,
            entry_routes,
            unmatched,
        }
    }

    /// The index of the route `path` matches.
    fn find(&self, path: &str) -> u16 {
        if let Some(index) = self.entry_route(path) {
            return index;
        }
        self.matcher.at(path).map_or(self.unmatched, |m| *m.value)
    }

    /// The route of `path` if it is one of the entry routes, found by
    /// comparing the fixed parts: a quarter of what the general matcher
    /// costs on the routes that take most requests. `None` sends the path
    /// to the general matcher (a test checks both agree).
    fn entry_route(&self, path: &str) -> Option<u16> {
        let [tables, entries] = ENTRY_ROUTE;
        let slash = |s: &str| s.bytes().position(|b| b == b'/');
        let rest = path.strip_prefix(tables)?;
        let (table, rest) = rest.split_at(slash(rest)?);
        let rest = rest.strip_prefix(entries)?;
        let (key, tail) = rest.split_at(slash(rest).unwrap_or(rest.len()));
        if table.is_empty() || key.is_empty() {
            return None;
        }
        let (_, index) = self.entry_routes.iter().find(|(t, _)| **t == *tail)?;
        Some(*index)
    }

    /// The index of the route with pattern `pattern`, if it has one.
    pub fn index_of(&self, pattern: &str) -> Option<u16> {
        let at = self.names.iter().position(|n| **n == *pattern)?;
        u16::try_from(at).ok().filter(|&i| i != self.unmatched)
    }

    /// The pattern of route `index`, or `unmatched`.
    fn name(&self, index: u16) -> &str {
        self.names.get(usize::from(index)).map_or(UNMATCHED, |n| n)
    }
}

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
        let debug = tracing::enabled!(Level::DEBUG);
        let log = shared.access_log || debug;

        let (req, watched) = super::drain::watch(req);
        let (counted, principal, served) = match admit(&shared, &req) {
            Err(refused) => {
                // The body is never read: dropping the request leaves all
                // of it over for the drain.
                drop(req);
                let answer: Served = Box::pin(std::future::ready(refused.into_response()));
                (false, None, answer)
            }
            Ok((counted, principal)) => {
                let name = log
                    .then(|| principal.as_ref().map(|p| p.name.clone()))
                    .flatten();
                let served = self.serve(req, route_index, principal, &id, &method, debug);
                (counted, name, served)
            }
        };
        let admitted = Admitted { shared, counted };
        Box::pin(async move {
            let mut resp = served.await;
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

impl<S> Front<S>
where
    S: Service<Request, Response = Response, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    /// Hands an admitted request to the router, under its deadline and
    /// with its caller in reach of the handler.
    fn serve(
        &mut self,
        req: Request,
        route_index: u16,
        principal: Option<Principal>,
        id: &HeaderValue,
        method: &Method,
        debug: bool,
    ) -> Served {
        let route = self.shared.routes.name(route_index);
        let span = if debug {
            tracing::debug_span!(
                "request",
                method = %method,
                route,
                id = id.to_str().unwrap_or("-"),
                principal = principal.as_ref().map_or("-", |p| &*p.name),
            )
        } else {
            tracing::Span::none()
        };
        let timeout = self.shared.state.limits.timeout;
        let Some(key) = super::idempotency::applies(&req) else {
            let handler = {
                let _entered = span.enter();
                dispatch(&self.shared, &mut self.inner, route_index, req)
            };
            return Box::pin(
                CALLER.scope(Cell::new(principal), with_deadline(handler, timeout, span)),
            );
        };
        // A task of its own: if the client goes away, the write and its
        // record still complete, so the key is neither left in flight nor
        // applied again by the retry.
        let mut inner = self.inner.clone();
        let shared = self.shared.clone();
        let who = principal.as_ref().map(|p| p.name.clone());
        let task = tokio::spawn(async move {
            super::idempotency::serve(&shared.state, req, who, key, |req| {
                let handler = {
                    let _entered = span.enter();
                    dispatch(&shared, &mut inner, route_index, req)
                };
                CALLER.scope(Cell::new(principal), with_deadline(handler, timeout, span))
            })
            .await
        });
        Box::pin(async move {
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
fn admit(shared: &Shared, req: &Request) -> Result<(bool, Option<Principal>), ApiError> {
    let state = &shared.state;
    let path = req.uri().path();
    let api = path.starts_with("/v1/");
    if api && !state.ready.load(Ordering::Acquire) {
        return Err(ApiError::Unavailable(
            "the server is starting or stopping".into(),
        ));
    }
    let probe = path == "/healthz" || path == "/readyz";
    let needs_auth = api || path == "/metrics";
    if !probe && !state.limits.try_enter() {
        return Err(ApiError::Unavailable(
            "too many requests in flight; retry shortly".into(),
        ));
    }
    let counted = !probe;
    match state
        .tokens
        .authenticate(req.headers().get(header::AUTHORIZATION))
    {
        Ok(who) => Ok((counted, Some(who))),
        Err(e) if needs_auth => {
            if counted {
                state.limits.leave();
            }
            Err(e)
        }
        Err(_) => Ok((counted, None)),
    }
}

/// Runs the handler; after `timeout` it is dropped and answered 503. The
/// timer is armed only if the handler does not finish on its first poll, so
/// a request served from memory never touches the timer wheel.
async fn with_deadline<F>(handler: F, timeout: Duration, span: tracing::Span) -> Response
where
    F: Future<Output = Response>,
{
    let mut handler = std::pin::pin!(handler);
    let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        let _entered = span.enter();
        if let Poll::Ready(resp) = handler.as_mut().poll(cx) {
            return Poll::Ready(resp);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_labelled_by_their_pattern() {
        let routes = RouteLabels::new(["/v1/tables/{table}", "/v1/tables/{table}/entries/{key}"]);
        let label = |path| routes.name(routes.find(path));
        assert_eq!(label("/v1/tables/t"), "/v1/tables/{table}");
        assert_eq!(
            label("/v1/tables/t/entries/k%2F1"),
            "/v1/tables/{table}/entries/{key}"
        );
        assert_eq!(label("/nope"), UNMATCHED);
        assert_ne!(routes.find("/v1/tables/t"), routes.find("/nope"));
    }

    fn served_routes() -> RouteLabels {
        crate::api::route_labels(&crate::api::openapi())
    }

    #[test]
    fn entry_routes_take_the_quick_way() {
        let routes = served_routes();
        assert_eq!(routes.entry_routes.len(), 4, "{:?}", routes.entry_routes);
        for (path, pattern) in [
            ("/v1/tables/t/entries/k", "/v1/tables/{table}/entries/{key}"),
            (
                "/v1/tables/t/entries/k/counter",
                "/v1/tables/{table}/entries/{key}/counter",
            ),
            (
                "/v1/tables/t/entries/k/take",
                "/v1/tables/{table}/entries/{key}/take",
            ),
        ] {
            let index = routes.entry_route(path).expect("an entry route");
            assert_eq!(routes.name(index), pattern);
        }
    }

    proptest::proptest! {
        /// The quick way never disagrees with the general matcher.
        #[test]
        fn the_quick_way_agrees_with_the_matcher(segments in proptest::collection::vec(
            proptest::sample::select(vec![
                "", "v1", "tables", "t", "import", "entries", "k", "counter", "take",
                "delete_object", "select", "k%2F1", "docs", "x",
            ]),
            0..9,
        )) {
            let routes = served_routes();
            let mut path = String::new();
            for s in &segments {
                path.push('/');
                path.push_str(s);
            }
            let quick = routes.entry_route(&path);
            let general = routes.matcher.at(&path).map(|m| *m.value).ok();
            if quick.is_some() {
                proptest::prop_assert_eq!(quick, general, "{}", path);
            }
        }

        /// The same, on paths that start the way entry routes do.
        #[test]
        fn the_quick_way_agrees_under_entries(table in "(import|t|)", key in "(k|entries|)", tail in "(/counter|/take|/delete_object|/x|/counter/x|/|)") {
            let routes = served_routes();
            let path = format!("/v1/tables/{table}/entries/{key}{tail}");
            let quick = routes.entry_route(&path);
            let general = routes.matcher.at(&path).map(|m| *m.value).ok();
            if quick.is_some() {
                proptest::prop_assert_eq!(quick, general, "{}", path);
            }
        }
    }
}
