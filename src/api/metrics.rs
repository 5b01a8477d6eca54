//! `GET /metrics`: Prometheus text format.
//!
//! Request counts and latency histograms go through a per-app
//! [`PrometheusRecorder`] (never a global one, so several servers in one
//! process keep apart). Table figures are read from the tables' own counters
//! at scrape time and formatted here, so a scrape shows a principal only the
//! tables it may read.

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusRecorder};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{authorize, Op, Principal};
use super::AppState;
use crate::store::Table;

/// Latency histogram buckets in seconds: 50 µs to 2.5 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5,
];

/// The server's metrics registry. Cloning is shallow.
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry with histogram buckets for latencies.
    pub fn new() -> Self {
        // set_buckets fails only for an empty list, which ours is not; the
        // fallback renders summaries instead of histograms.
        let builder = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new());
        Metrics {
            recorder: Arc::new(builder.build_recorder()),
        }
    }

    /// Counts one request and records its latency.
    pub fn record_request(&self, route: &str, method: &str, status: u16, seconds: f64) {
        metrics::with_local_recorder(self.recorder.as_ref(), || {
            let labels = [
                ("route", route.to_owned()),
                ("method", method.to_owned()),
                ("status", status.to_string()),
            ];
            metrics::counter!("larder_http_requests_total", &labels).increment(1);
            metrics::histogram!("larder_http_request_duration_seconds", &labels).record(seconds);
        });
    }

    /// A histogram handle for write-back round durations, in seconds.
    pub fn writeback_histogram(&self) -> metrics::Histogram {
        metrics::with_local_recorder(self.recorder.as_ref(), || {
            metrics::histogram!("larder_writeback_round_duration_seconds")
        })
    }

    /// The registry's metrics in Prometheus text format.
    pub fn render(&self) -> String {
        self.recorder.handle().render()
    }
}

/// Middleware: counts and times every request by route and status.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    // `:table` rather than `{table}`: some exposition-format parsers stumble
    // on braces inside label values.
    let route = req.extensions().get::<MatchedPath>().map_or_else(
        || "unmatched".to_owned(),
        |p| p.as_str().replace('{', ":").replace('}', ""),
    );
    let method = req.method().as_str().to_owned();
    let resp = next.run(req).await;
    state.metrics.record_request(
        &route,
        &method,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// Routes for `/metrics`.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(get_metrics))
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
    let mut out = state.metrics.render();
    let tables: Vec<Arc<Table>> = state
        .store
        .tables()
        .into_iter()
        .filter(|t| authorize(t, &who, Op::Read).is_ok())
        .collect();
    write_tables(&mut out, &tables);
    write_server(&mut out, &state);
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
        "larder_table_memory_bytes",
        "gauge",
        "Estimated bytes held.",
        &rows(&|t| t.memory_bytes()),
    );
    let stat = |f: fn(&crate::store::Stats) -> &std::sync::atomic::AtomicU64| {
        move |t: &Table| f(&t.stats).load(Relaxed)
    };
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
    let persistent: Vec<(&str, u64)> = tables
        .iter()
        .filter(|t| t.dirty().is_some())
        .map(|t| (t.name(), t.dirty_count()))
        .collect();
    family(
        out,
        "larder_table_dirty_objects",
        "gauge",
        "Objects changed in memory and not yet on disk.",
        &persistent,
    );
}

fn write_server(out: &mut String, state: &AppState) {
    let single = |out: &mut String, name: &str, kind: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    single(
        out,
        "larder_memory_bytes",
        "gauge",
        "Estimated bytes held by all tables.",
        state.store.memory_bytes(),
    );
    single(
        out,
        "larder_tables",
        "gauge",
        "Tables that exist.",
        state.store.table_count() as u64,
    );
    let s = state.durability.stats();
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_requests_are_rendered() {
        let m = Metrics::new();
        m.record_request("/x", "GET", 200, 0.001);
        m.record_request("/x", "GET", 200, 0.002);
        let text = m.render();
        assert!(
            text.contains(r#"larder_http_requests_total{route="/x",method="GET",status="200"} 2"#),
            "{text}"
        );
    }
}
