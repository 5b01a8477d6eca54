//! Handlers reached without axum's router.
//!
//! [`front::Front`](super::front::Front) already knows which route a request
//! matched (it labels metrics with it), so for every documented route and
//! method it calls the handler itself. Going through the router would match
//! the path a second time and, for a route with captures, copy each capture
//! into a map in the request's extensions (two reference-counted strings per
//! capture, a vector, the map and its box): about 3,000 instructions and
//! seven allocations per request that no handler reads, since [`TablePath`]
//! and [`EntryPath`] take the table and key from their fixed places in the
//! path.
//!
//! The router stays behind for what is not in the table: the docs, the
//! fallbacks (404 and 405), and HEAD on a route that only has GET.
//!
//! Routes are declared once, with `api_routes!`, which gives both the
//! documented axum route (through `utoipa_axum::routes!`) and the direct
//! entries, so the two cannot disagree.
//!
//! [`TablePath`]: super::extract::TablePath
//! [`EntryPath`]: super::extract::EntryPath

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::extract::Request;
use axum::handler::Handler;
use axum::http::Method;
use axum::response::Response;
use utoipa::openapi::HttpMethod;
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};

use super::AppState;

/// A handler's answer, on its way.
pub type Served = Pin<Box<dyn Future<Output = Response> + Send>>;

/// One handler, callable with the request and the state.
type DirectFn = Arc<dyn Fn(Request, AppState) -> Served + Send + Sync>;

/// One documented handler: its path pattern, methods and a way to call it.
pub struct Direct {
    path: String,
    methods: Vec<Method>,
    call: DirectFn,
}

impl std::fmt::Debug for Direct {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Direct")
            .field("path", &self.path)
            .field("methods", &self.methods)
            .finish_non_exhaustive()
    }
}

impl Direct {
    /// The handler `handler`, documented by `P` (the type
    /// `#[utoipa::path]` generates for it).
    pub fn new<P, H, T>(handler: H) -> Self
    where
        P: utoipa::Path,
        H: Handler<T, AppState, Future = Served>,
        T: 'static,
    {
        Direct {
            path: P::path(),
            methods: P::methods().iter().filter_map(http_method).collect(),
            call: Arc::new(move |req, state| handler.clone().call(req, state)),
        }
    }
}

fn http_method(m: &HttpMethod) -> Option<Method> {
    Some(match m {
        HttpMethod::Get => Method::GET,
        HttpMethod::Head => Method::HEAD,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Delete => Method::DELETE,
        HttpMethod::Patch => Method::PATCH,
        HttpMethod::Options | HttpMethod::Trace => return None,
    })
}

/// The methods a route can have a direct handler for, by slot.
const METHODS: usize = 6;

fn slot(method: &Method) -> Option<usize> {
    Some(match *method {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        _ => return None,
    })
}

/// Routes declared by a module: the documented router and the direct
/// handlers, built together by [`ApiRoutes::routes`].
pub struct ApiRoutes {
    doc: OpenApiRouter<AppState>,
    direct: Vec<Direct>,
}

impl Default for ApiRoutes {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiRoutes {
    /// No routes yet, documented by `doc`'s base document.
    pub fn with_openapi(doc: utoipa::openapi::OpenApi) -> Self {
        ApiRoutes {
            doc: OpenApiRouter::with_openapi(doc),
            direct: Vec::new(),
        }
    }

    /// No routes yet.
    pub fn new() -> Self {
        ApiRoutes {
            doc: OpenApiRouter::new(),
            direct: Vec::new(),
        }
    }

    /// Adds the handlers of one path, as `api_routes!` gives them.
    #[must_use]
    pub fn routes(mut self, (doc, direct): (UtoipaMethodRouter<AppState>, Vec<Direct>)) -> Self {
        self.doc = self.doc.routes(doc);
        self.direct.extend(direct);
        self
    }

    /// Adds every route of `other`.
    #[must_use]
    pub fn merge(mut self, other: ApiRoutes) -> Self {
        self.doc = self.doc.merge(other.doc);
        self.direct.extend(other.direct);
        self
    }

    /// The documented router, and the direct handlers.
    pub fn split(self) -> (OpenApiRouter<AppState>, Vec<Direct>) {
        (self.doc, self.direct)
    }
}

/// Declares the handlers of one path: the documented axum route and a
/// direct entry per handler, from the same list.
#[macro_export]
macro_rules! api_routes {
    ($($handler:ident),+ $(,)?) => {
        (
            ::utoipa_axum::routes!($($handler),+),
            vec![$(
                ::utoipa_axum::paste! {
                    $crate::api::direct::Direct::new::<[<__path_ $handler>], _, _>($handler)
                }
            ),+],
        )
    };
}

/// Direct handlers by route index (as [`RouteLabels`] numbers routes) and
/// method.
///
/// [`RouteLabels`]: super::routes::RouteLabels
#[derive(Default)]
pub struct DirectTable {
    by_route: Vec<[Option<DirectFn>; METHODS]>,
}

impl std::fmt::Debug for DirectTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectTable")
            .field("handlers", &self.len())
            .finish()
    }
}

impl DirectTable {
    /// A table of `handlers`; `index` gives a path pattern's route index,
    /// or `None` for a path left out (its requests go to the router).
    pub fn new(handlers: Vec<Direct>, index: impl Fn(&str) -> Option<u16>) -> Self {
        let mut by_route: Vec<[Option<DirectFn>; METHODS]> = Vec::new();
        for handler in handlers {
            let Some(route) = index(&handler.path).map(usize::from) else {
                continue;
            };
            if by_route.len() <= route {
                by_route.resize_with(route + 1, Default::default);
            }
            for method in handler.methods.iter().filter_map(slot) {
                by_route[route][method] = Some(handler.call.clone());
            }
        }
        DirectTable { by_route }
    }

    /// The handler for `method` on route `route`, if it is called directly.
    pub fn get(
        &self,
        route: u16,
        method: &Method,
    ) -> Option<&(dyn Fn(Request, AppState) -> Served + Send + Sync)> {
        let handlers = self.by_route.get(usize::from(route))?;
        handlers.get(slot(method)?)?.as_deref()
    }

    /// How many (route, method) pairs are called directly.
    pub fn len(&self) -> usize {
        self.by_route.iter().flatten().flatten().count()
    }

    /// Whether no handler is called directly.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
