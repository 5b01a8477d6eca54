//! The route table as the front service sees it: each request's route,
//! found once, labels its metrics and logs and tells what the request does.
//!
//! What a request does is decided by its route and method, never by how
//! its path ends (an entry whose key is `select` is an entry like any
//! other): whether it only reads, writes table data, or manages tables
//! (which read-only tokens and `Idempotency-Key` care about), whether it is
//! long work (which waits for a slot of `--max-long-requests`), and which
//! body limit applies.

use axum::http::Method;

/// What a route does to the server's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    /// Reads only: GET and HEAD, `lookup`, `select`, `select_count`, and
    /// everything outside `/v1` (probes, metrics, docs).
    Read,
    /// Changes table data: entry writes, bulk inserts, clears,
    /// `select_delete`, `sync`, imports.
    Write,
    /// Changes tables themselves: create, drop, PATCH, `give_away`.
    Manage,
}

/// What a request with a given route and method is, for the front service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteClass {
    /// Read, write or manage.
    pub kind: RouteKind,
    /// Long work: a scan, select, export or import, which takes a slot of
    /// `--max-long-requests` and pages by time and bytes.
    pub long: bool,
    /// The body is an import stream, bound by `--max-import-bytes` rather
    /// than `--max-body-bytes`.
    pub import: bool,
}

impl RouteClass {
    /// A read that is not long: probes, docs, unmatched paths.
    pub const OTHER: RouteClass = RouteClass {
        kind: RouteKind::Read,
        long: false,
        import: false,
    };

    /// Whether the request may change something (a write or a manage).
    pub fn changes(self) -> bool {
        self.kind != RouteKind::Read
    }
}

/// The methods routes are classified for, by slot.
const SLOT_METHODS: [&Method; METHOD_SLOTS] = [
    &Method::GET,
    &Method::HEAD,
    &Method::POST,
    &Method::PUT,
    &Method::DELETE,
    &Method::PATCH,
];
const METHOD_SLOTS: usize = 6;

fn method_slot(method: &Method) -> Option<usize> {
    SLOT_METHODS.iter().position(|m| *m == method)
}

/// What `method` on the route `pattern` (axum's syntax) does.
fn classify(pattern: &str, method: &Method) -> RouteClass {
    let tail = pattern.strip_prefix("/v1/tables/{table}");
    let read = |long| RouteClass {
        kind: RouteKind::Read,
        long,
        import: false,
    };
    let write = |long, import| RouteClass {
        kind: RouteKind::Write,
        long,
        import,
    };
    let manage = RouteClass {
        kind: RouteKind::Manage,
        long: false,
        import: false,
    };
    if !pattern.starts_with("/v1/") {
        return RouteClass::OTHER;
    }
    if *method == Method::GET || *method == Method::HEAD {
        let long = matches!(tail, Some("/entries" | "/export")) || pattern == "/v1/export";
        return read(long);
    }
    match (pattern, tail) {
        ("/v1/tables/import" | "/v1/import", _) => write(true, true),
        ("/v1/tables", _) => manage,
        (_, Some("")) => manage,
        (_, Some("/give_away")) => manage,
        (_, Some("/lookup")) => read(false),
        (_, Some("/select" | "/select_count")) => read(true),
        (_, Some("/select_delete")) => write(true, false),
        _ => write(false, false),
    }
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
    /// What each route does, by index and method slot.
    classes: Vec<[RouteClass; METHOD_SLOTS]>,
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
        let mut classes = Vec::new();
        for pattern in patterns {
            let Ok(index) = u16::try_from(names.len()) else {
                break;
            };
            match matcher.insert(pattern, index) {
                Ok(()) => {
                    names.push(pattern.into());
                    classes.push(std::array::from_fn(|slot| {
                        classify(pattern, SLOT_METHODS[slot])
                    }));
                }
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
        classes.push([RouteClass::OTHER; METHOD_SLOTS]);
        RouteLabels {
            matcher,
            names,
            entry_routes,
            unmatched,
            classes,
        }
    }

    /// The index of the route `path` matches.
    pub fn find(&self, path: &str) -> u16 {
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

    /// What a request with `method` on route `index` does.
    pub fn class(&self, index: u16, method: &Method) -> RouteClass {
        let slot = method_slot(method);
        self.classes
            .get(usize::from(index))
            .and_then(|c| slot.map(|s| c[s]))
            .unwrap_or(RouteClass::OTHER)
    }

    /// The pattern of route `index`, or `unmatched`.
    pub fn name(&self, index: u16) -> &str {
        self.names.get(usize::from(index)).map_or(UNMATCHED, |n| n)
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

    #[test]
    fn routes_are_classified_by_route_and_method() {
        let routes = served_routes();
        let class = |method: Method, path: &str| routes.class(routes.find(path), &method);
        let kind = |method: Method, path: &str| class(method, path).kind;
        use RouteKind::*;
        assert_eq!(kind(Method::GET, "/v1/tables/t/entries/k"), Read);
        assert_eq!(kind(Method::PUT, "/v1/tables/t/entries/k"), Write);
        // Keys that look like route names are keys.
        for key in ["lookup", "select", "select_count", "import", "export"] {
            let path = format!("/v1/tables/t/entries/{key}");
            assert_eq!(kind(Method::PUT, &path), Write, "{path}");
            assert!(!class(Method::PUT, &path).long, "{path}");
        }
        assert_eq!(kind(Method::POST, "/v1/tables/t/lookup"), Read);
        assert_eq!(kind(Method::POST, "/v1/tables/t/select"), Read);
        assert!(class(Method::POST, "/v1/tables/t/select").long);
        assert_eq!(kind(Method::POST, "/v1/tables/t/select_delete"), Write);
        assert_eq!(kind(Method::POST, "/v1/tables"), Manage);
        assert_eq!(kind(Method::DELETE, "/v1/tables/t"), Manage);
        assert_eq!(kind(Method::PATCH, "/v1/tables/t"), Manage);
        assert_eq!(kind(Method::POST, "/v1/tables/t/give_away"), Manage);
        assert_eq!(kind(Method::DELETE, "/v1/tables/t/entries"), Write);
        assert_eq!(kind(Method::POST, "/v1/tables/t/sync"), Write);
        let import = class(Method::POST, "/v1/tables/import");
        assert!(import.import && import.long && import.changes());
        assert!(class(Method::GET, "/v1/tables/t/entries").long);
        assert!(class(Method::GET, "/v1/export").long);
        assert_eq!(class(Method::GET, "/healthz"), RouteClass::OTHER);
        assert_eq!(class(Method::POST, "/nowhere"), RouteClass::OTHER);
    }
}
