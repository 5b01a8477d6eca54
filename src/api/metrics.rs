//! `GET /metrics`: Prometheus text format.
//!
//! Request counts and latency histograms are kept per route, method and
//! status in [`Metrics`], one per app (never global, so several servers in
//! one process keep apart). Recording a request hashes its labels, finds
//! its series in a thread-local cache and adds to three atomics of that
//! thread's stripe; label text is formatted once per series, not per
//! request. Table figures are read from the tables' own counters at scrape
//! time, so a scrape shows a principal only the tables it may read.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::direct::ApiRoutes;
use crate::api_routes;
use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};

use super::auth::{authorize, Op, Principal};
use super::AppState;
use crate::histogram::Histogram;
use crate::store::Table;
use crate::stripe::Striped;

/// Request metrics and the write-back round histogram. Cloning is shallow.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    inner: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    /// Tells this registry's series apart in the threads' caches (tests
    /// run several servers in one process).
    id: u64,
    /// One series per (route, method, status), keyed by a hash of the three.
    /// Locked only to add a series and to render.
    requests: Mutex<HashMap<u64, Arc<Series>>>,
    /// Durations of write-back rounds.
    writeback: Arc<Histogram>,
    /// Durations of the durable tier's fsyncs (sled flushes).
    fsync: Arc<Histogram>,
}

impl Default for Registry {
    fn default() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Registry {
            id: NEXT.fetch_add(1, Relaxed),
            requests: Mutex::default(),
            writeback: Arc::default(),
            fsync: Arc::default(),
        }
    }
}

/// A series of requests: its labels, formatted once, and its latencies
/// (whose count is the request count), striped by thread (see
/// [`crate::stripe`]) since every request of a route records into it.
#[derive(Debug)]
struct Series {
    labels: String,
    latency: Striped<Histogram>,
}

thread_local! {
    /// Series this thread has recorded into, by (registry, series key), so
    /// the request path takes no shared lock to find them.
    static SEEN: RefCell<SeriesCache> = RefCell::default();
}

/// A thread's series, by (registry, series key).
type SeriesCache = HashMap<(u64, u64), Arc<Series>, BuildHasherDefault<KeyHasher>>;

/// A hasher for keys that are a few small integers: one multiply per
/// word, where the default hasher runs a keyed hash meant for text an
/// attacker controls. The keys here come from a bounded set.
#[derive(Debug, Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(26) ^ n).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A small code and the label of a request method; every method outside
/// the standard ones shares `other`.
fn method_label(method: &Method) -> (u8, &'static str) {
    const KNOWN: [(Method, &str); 9] = [
        (Method::GET, "GET"),
        (Method::HEAD, "HEAD"),
        (Method::POST, "POST"),
        (Method::PUT, "PUT"),
        (Method::DELETE, "DELETE"),
        (Method::PATCH, "PATCH"),
        (Method::OPTIONS, "OPTIONS"),
        (Method::TRACE, "TRACE"),
        (Method::CONNECT, "CONNECT"),
    ];
    KNOWN
        .iter()
        .zip(0u8..)
        .find(|((m, _), _)| m == method)
        .map_or((u8::MAX, "other"), |((_, label), code)| (code, *label))
}

impl Series {
    fn record(&self, took: Duration) {
        self.latency.mine().record(took);
    }

    fn merged(&self) -> Histogram {
        let merged = Histogram::default();
        for h in self.latency.all() {
            merged.add(h);
        }
        merged
    }
}

impl Metrics {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts one request and records its latency. `route` is the matched
    /// route pattern (`/v1/tables/{table}`), or `unmatched`, and
    /// `route_index` tells it apart from every other pattern in one number.
    /// Methods outside the standard nine are labelled `other`, so clients
    /// cannot add series without bound.
    pub fn record_request(
        &self,
        route_index: u16,
        route: &str,
        method: &Method,
        status: u16,
        took: Duration,
    ) {
        let (method_code, method) = method_label(method);
        let series_key =
            (u64::from(route_index) << 24) | (u64::from(method_code) << 16) | u64::from(status);
        let key = (self.inner.id, series_key);
        let cached = SEEN.with(|seen| seen.borrow().get(&key).cloned());
        let series = cached.unwrap_or_else(|| {
            let series = self
                .inner
                .requests
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(series_key)
                .or_insert_with(|| {
                    Arc::new(Series {
                        // `:table` rather than `{table}`: some exposition-format
                        // parsers stumble on braces inside label values.
                        labels: format!(
                            "route=\"{}\",method=\"{method}\",status=\"{status}\"",
                            route.replace('{', ":").replace('}', ""),
                        ),
                        latency: Striped::default(),
                    })
                })
                .clone();
            SEEN.with(|seen| seen.borrow_mut().insert(key, series.clone()));
            series
        });
        series.record(took);
    }

    /// The histogram of write-back round durations.
    pub fn writeback_histogram(&self) -> Arc<Histogram> {
        self.inner.writeback.clone()
    }

    /// The histogram of fsync durations.
    pub fn fsync_histogram(&self) -> Arc<Histogram> {
        self.inner.fsync.clone()
    }

    /// The request and write-back metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut series: Vec<(String, Histogram)> = self
            .inner
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|s| (s.labels.clone(), s.merged()))
            .collect();
        series.sort_by(|a, b| a.0.cmp(&b.0));
        let mut out = String::new();
        out.push_str(
            "# HELP larder_http_requests_total Requests answered, by route, method and status.\n",
        );
        out.push_str("# TYPE larder_http_requests_total counter\n");
        for (labels, latency) in &series {
            let _ = writeln!(
                out,
                "larder_http_requests_total{{{labels}}} {}",
                latency.count()
            );
        }
        out.push_str("# HELP larder_http_request_duration_seconds Time to answer, by route, method and status.\n");
        out.push_str("# TYPE larder_http_request_duration_seconds histogram\n");
        for (labels, latency) in &series {
            latency.render(&mut out, "larder_http_request_duration_seconds", labels);
        }
        out.push_str(
            "# HELP larder_writeback_round_duration_seconds Duration of write-back rounds.\n",
        );
        out.push_str("# TYPE larder_writeback_round_duration_seconds histogram\n");
        self.inner
            .writeback
            .render(&mut out, "larder_writeback_round_duration_seconds", "");
        out.push_str(
            "# HELP larder_fsync_duration_seconds Duration of the durable tier's fsyncs (a write-back round has one, or one per large batch).\n",
        );
        out.push_str("# TYPE larder_fsync_duration_seconds histogram\n");
        self.inner
            .fsync
            .render(&mut out, "larder_fsync_duration_seconds", "");
        process_metrics(&mut out);
        out
    }
}

/// The standard `process_*` series (as Prometheus client libraries
/// export them) and `larder_build_info`, read from `/proc` where there is
/// one.
fn process_metrics(out: &mut String) {
    let _ =
        writeln!(
        out,
        "# HELP larder_build_info The running build (value 1).\n# TYPE larder_build_info gauge\n\
         larder_build_info{{version=\"{}\",profile=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    let Some(p) = crate::procfs::read_self() else {
        return;
    };
    let _ = writeln!(
        out,
        "# HELP process_start_time_seconds Start time of the process since the Unix epoch, in seconds.\n\
         # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {:.2}",
        p.start_time_seconds
    );
    let gauge = |out: &mut String, name: &str, kind: &str, help: &str, v: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
        );
    };
    gauge(
        out,
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, in seconds.",
        p.cpu_seconds,
    );
    gauge(
        out,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size, in bytes.",
        p.resident_bytes as f64,
    );
    gauge(
        out,
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size, in bytes.",
        p.virtual_bytes as f64,
    );
    gauge(
        out,
        "process_open_fds",
        "gauge",
        "Open file descriptors.",
        p.open_fds as f64,
    );
    if let Some(max) = p.max_fds {
        gauge(
            out,
            "process_max_fds",
            "gauge",
            "The open-file limit.",
            max as f64,
        );
    }
}

/// Routes for `/metrics`.
pub fn router() -> ApiRoutes {
    ApiRoutes::new().routes(api_routes!(get_metrics))
}

/// Prometheus metrics.
///
/// Text exposition format: request counts and latency histograms by route,
/// method and status; per table (only tables the caller may read): objects,
/// estimated memory, hits, misses, inserts, deletes, expirations,
/// evictions, origin fetches and errors, and for persistent tables the dirty
/// count; server-wide memory; write-back rounds, keys written, sync writes
/// per fsync and round durations.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "service",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String))
)]
pub async fn get_metrics(State(state): State<AppState>, who: Principal) -> Response {
    render(&state, &who)
}

/// The metrics as `who` may see them: series of tables it may not read are
/// left out.
pub fn render(state: &AppState, who: &Principal) -> Response {
    let mut out = state.metrics.render();
    let tables: Vec<Arc<Table>> = state
        .tables
        .store()
        .tables()
        .into_iter()
        .filter(|t| authorize(t, who, Op::Read).is_ok())
        .collect();
    write_tables(&mut out, &tables);
    write_server(&mut out, state);
    state.tables.render_metrics(&mut out);
    let mut resp = (StatusCode::OK, out).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

fn family(out: &mut String, name: &str, kind: &str, help: &str, rows: &[(&str, u64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (table, value) in rows {
        // Table names are [A-Za-z0-9_.-]: nothing to escape in a label.
        let _ = writeln!(out, "{name}{{table=\"{table}\"}} {value}");
    }
}

fn write_tables(out: &mut String, tables: &[Arc<Table>]) {
    let rows = |f: &dyn Fn(&Table) -> u64| -> Vec<(&str, u64)> {
        tables.iter().map(|t| (t.name(), f(t))).collect()
    };
    family(
        out,
        "larder_table_objects",
        "gauge",
        "Objects stored.",
        &rows(&|t| t.size()),
    );
    family(
        out,
        "larder_table_stale_entries",
        "gauge",
        "Expired entries kept out of sight for origin.stale_if_error_ms (at most --max-stale-entries per table).",
        &rows(&|t| t.stale_entries() as u64),
    );
    family(
        out,
        "larder_table_memory_bytes",
        "gauge",
        "Estimated bytes held.",
        &rows(&|t| t.memory_bytes()),
    );
    let stat = |f: fn(&crate::store::Stats) -> &crate::store::Counter| {
        move |t: &Table| f(&t.stats).load(Relaxed)
    };
    family(
        out,
        "larder_table_stale_served_total",
        "counter",
        "Misses answered with a stale copy because the origin failed or its breaker was open.",
        &rows(&stat(|s| &s.stale_served)),
    );
    family(
        out,
        "larder_table_hits_total",
        "counter",
        "Lookups that found a live entry.",
        &rows(&stat(|s| &s.hits)),
    );
    family(
        out,
        "larder_table_misses_total",
        "counter",
        "Lookups that found nothing.",
        &rows(&stat(|s| &s.misses)),
    );
    family(
        out,
        "larder_table_inserts_total",
        "counter",
        "Objects inserted.",
        &rows(&stat(|s| &s.inserts)),
    );
    family(
        out,
        "larder_table_deletes_total",
        "counter",
        "Objects deleted.",
        &rows(&stat(|s| &s.deletes)),
    );
    family(
        out,
        "larder_table_expired_total",
        "counter",
        "Keys removed because their TTL passed.",
        &rows(&stat(|s| &s.expired)),
    );
    family(
        out,
        "larder_table_evicted_total",
        "counter",
        "Keys evicted for max_entries or the memory limit.",
        &rows(&stat(|s| &s.evicted)),
    );
    family(
        out,
        "larder_table_origin_fetches_total",
        "counter",
        "Requests made to the table's origin.",
        &rows(&stat(|s| &s.origin_fetches)),
    );
    family(
        out,
        "larder_table_origin_errors_total",
        "counter",
        "Origin requests that failed or timed out.",
        &rows(&stat(|s| &s.origin_errors)),
    );
    family(
        out,
        "larder_table_watchers",
        "gauge",
        "Change streams open on the table.",
        &rows(&|t| t.hub().map_or(0, |h| h.watchers() as u64)),
    );
    // Durable tables only: memory tables have no write-back.
    let durable = |f: fn(&Table) -> u64| -> Vec<(&str, u64)> {
        tables
            .iter()
            .filter(|t| t.dirty().is_some())
            .map(|t| (t.name(), f(t)))
            .collect()
    };
    family(
        out,
        "larder_table_dirty_objects",
        "gauge",
        "Objects changed in memory and not yet on disk.",
        &durable(Table::dirty_count),
    );
    family(
        out,
        "larder_table_grouped_keys",
        "gauge",
        "Keys of transactions waiting to be written back together (past --max-grouped-keys the write-back runs at once).",
        &durable(Table::grouped_keys),
    );
}

fn write_server(out: &mut String, state: &AppState) {
    let single = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    let memory = state.tables.store().memory();
    out.push_str("# HELP larder_memory_bytes Estimated bytes held for clients, by kind; their sum is what --max-memory-bytes limits.\n");
    out.push_str("# TYPE larder_memory_bytes gauge\n");
    for kind in crate::store::MemoryKind::ALL {
        let _ = writeln!(
            out,
            "larder_memory_bytes{{kind=\"{}\"}} {}",
            kind.label(),
            memory.of(kind)
        );
    }
    single(
        out,
        "larder_memory_limit_bytes",
        "gauge",
        "The server-wide memory limit (--max-memory-bytes); 0 for none.",
        memory.limit(),
    );
    single(
        out,
        "larder_tables",
        "gauge",
        "Tables that exist.",
        state.tables.store().table_count() as u64,
    );
    let s = state.tables.durability().stats();
    single(
        out,
        "larder_writeback_rounds_total",
        "counter",
        "Write-back rounds that fsynced.",
        s.rounds.load(Relaxed),
    );
    single(
        out,
        "larder_writeback_keys_total",
        "counter",
        "Keys written by write-back rounds.",
        s.keys_written.load(Relaxed),
    );
    single(
        out,
        "larder_sync_writes_total",
        "counter",
        "Sync-mode writes made durable; divide by rounds for writes per fsync.",
        s.sync_tickets.load(Relaxed),
    );
    let (_, evicted) = state.idempotency.stats();
    single(
        out,
        "larder_idempotency_evicted_total",
        "counter",
        "Remembered answers of memory tables expired early to stay under --idempotency-max-bytes.",
        evicted,
    );
    let (indexed, max_indexed) = state.tables.durability().record_index().stats();
    single(
        out,
        "larder_idempotency_index_entries",
        "gauge",
        "Idempotency records of durable tables indexed in memory, stored many to one disk item.",
        indexed as u64,
    );
    single(
        out,
        "larder_idempotency_index_max_entries",
        "gauge",
        "The bound of that index (--idempotency-index-entries); past it records are stored one by one.",
        max_indexed as u64,
    );
    let filter = state.tables.durability().record_filter();
    let (records, skipped, false_positives) = filter.stats();
    single(
        out,
        "larder_idempotency_filter_bytes",
        "gauge",
        "Bytes of the idempotency record filter (see --idempotency-filter-bytes).",
        filter.allocated_bytes(),
    );
    single(
        out,
        "larder_idempotency_filter_records",
        "gauge",
        "Records entered in the filter since it was last rebuilt.",
        records,
    );
    single(
        out,
        "larder_idempotency_filter_skipped_total",
        "counter",
        "Keyed writes to durable tables the filter knew to be new, without a disk lookup.",
        skipped,
    );
    single(
        out,
        "larder_idempotency_filter_false_positives_total",
        "counter",
        "Disk lookups the filter let through that found no record.",
        false_positives,
    );
    single(
        out,
        "larder_background_tasks",
        "gauge",
        "Background tasks running (sweeper, history retirer, record purger, cluster follower and sweeper).",
        state.tables.tasks().running() as u64,
    );
    single(
        out,
        "larder_rate_limited_total",
        "counter",
        "Requests refused with 429 rate_limited.",
        state.rates.refused(),
    );
    let (clients, max_clients) = state.rates.clients();
    single(
        out,
        "larder_rate_limit_clients",
        "gauge",
        "Client addresses whose rate-limit buckets are kept (at most --rate-limit-max-clients).",
        clients as u64,
    );
    single(
        out,
        "larder_rate_limit_principals",
        "gauge",
        "Principals whose rate-limit buckets are kept (at most --rate-limit-max-clients).",
        state.rates.principals() as u64,
    );
    single(
        out,
        "larder_rate_limit_max_clients",
        "gauge",
        "The most client addresses whose buckets may be kept (--rate-limit-max-clients).",
        max_clients as u64,
    );
    let reloaded = state.tokens.last_reload().unwrap_or(true);
    out.push_str(
        "# HELP larder_reload_success Whether the last reload (SIGHUP) of each source succeeded (1) or was refused (0).\n\
         # TYPE larder_reload_success gauge\n",
    );
    out.push_str(if reloaded {
        "larder_reload_success{what=\"tokens\"} 1\n"
    } else {
        "larder_reload_success{what=\"tokens\"} 0\n"
    });
    if let Some(tls) = &state.tls {
        out.push_str(if tls.last_reload().unwrap_or(true) {
            "larder_reload_success{what=\"tls\"} 1\n"
        } else {
            "larder_reload_success{what=\"tls\"} 0\n"
        });
    }
    let (running, slots, shed) = state.limits.long_stats();
    single(
        out,
        "larder_long_requests_running",
        "gauge",
        "Scans, selects, exports and imports running now.",
        running as u64,
    );
    single(
        out,
        "larder_long_requests_max",
        "gauge",
        "Slots for long requests (--max-long-requests).",
        slots as u64,
    );
    single(
        out,
        "larder_long_requests_shed_total",
        "counter",
        "Long requests answered 503 after waiting for a slot until their deadline.",
        shed,
    );
    let conns = state.connections.stats();
    single(
        out,
        "larder_connections_open",
        "gauge",
        "Client connections being served.",
        conns.open as u64,
    );
    single(
        out,
        "larder_connections_max",
        "gauge",
        "The connection cap (--max-connections, lowered to the open-file limit).",
        conns.max as u64,
    );
    let breakers = state.origins.breakers();
    if !breakers.is_empty() {
        out.push_str(
            "# HELP larder_origin_breaker_open Whether the origin's circuit breaker is open (1): it is not called for now.\n\
             # TYPE larder_origin_breaker_open gauge\n",
        );
        // `host:port` of a parsed URL: no quote or backslash to escape.
        for (origin, open) in breakers {
            let _ = writeln!(
                out,
                "larder_origin_breaker_open{{origin=\"{origin}\"}} {}",
                u8::from(open)
            );
        }
    }
    if let Some(admin) = &state.admin_connections {
        let stats = admin.stats();
        single(
            out,
            "larder_admin_connections_open",
            "gauge",
            "Connections the admin listener is serving.",
            stats.open as u64,
        );
        single(
            out,
            "larder_admin_connections_max",
            "gauge",
            "The admin listener's connection cap (--admin-max-connections).",
            stats.max as u64,
        );
    }
    out.push_str(
        "# HELP larder_connections_closed_total Connections the server closed, by reason.\n",
    );
    out.push_str("# TYPE larder_connections_closed_total counter\n");
    for (reason, n) in crate::net::CloseReason::ALL.iter().zip(conns.closed) {
        let _ = writeln!(
            out,
            "larder_connections_closed_total{{reason=\"{}\"}} {n}",
            reason.label()
        );
    }
    single(
        out,
        "larder_memory_trims_total",
        "counter",
        "Times freed heap memory was given back to the OS after write-back.",
        s.trims.load(Relaxed),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_requests_are_rendered() {
        let m = Metrics::new();
        let ms = std::time::Duration::from_millis;
        m.record_request(0, "/x", &Method::GET, 200, ms(1));
        m.record_request(0, "/x", &Method::GET, 200, ms(2));
        m.record_request(0, "/x", &Method::GET, 404, ms(2));
        m.record_request(1, "/y", &Method::GET, 200, ms(2));
        let text = m.render();
        for series in [
            r#"larder_http_requests_total{route="/x",method="GET",status="200"} 2"#,
            r#"larder_http_requests_total{route="/x",method="GET",status="404"} 1"#,
            r#"larder_http_requests_total{route="/y",method="GET",status="200"} 1"#,
        ] {
            assert!(text.contains(series), "{series} in {text}");
        }
    }

    #[test]
    fn unusual_methods_share_one_label() {
        let m = Metrics::new();
        let ms = std::time::Duration::from_millis;
        for name in ["FOO", "BAR", "BAZ"] {
            let method = Method::from_bytes(name.as_bytes()).unwrap();
            m.record_request(0, "/x", &method, 405, ms(1));
        }
        m.record_request(0, "/x", &Method::DELETE, 405, ms(1));
        let text = m.render();
        assert!(
            text.contains(
                r#"larder_http_requests_total{route="/x",method="other",status="405"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"larder_http_requests_total{route="/x",method="DELETE",status="405"} 1"#
            ),
            "{text}"
        );
    }
}
