//! Select and multi-get rows, each against the plain operation it replaces
//! on the same server:
//!
//! - a select of 100 objects from a random start in an ordered_set of
//!   `--memory-entries` objects (1M by default), with a `range`, against a
//!   scan of the same 100;
//! - a multi-get of 100 keys against 100 single GETs (keys per second);
//! - `select_count` with a guard over a table of 100,000 objects, as
//!   objects examined per second;
//! - an export of the big table: objects per second, and how much the
//!   server's resident memory grew while it streamed;
//! - `/healthz` latency (p50, p99) while one heavy select per core walks
//!   the big table: long work yields, so other requests still get served
//!   (target p99 under 50 ms).

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::pair::PairRow;
use crate::procs::{fail, http, Proc};
use crate::wrk::{self, Workload};
use crate::{create, fill_with, key, value100, Options};

/// Everything the select rows measured.
#[derive(Debug, Serialize)]
pub struct SelectReport {
    pub rows: Vec<PairRow>,
    /// Objects in the select_count table.
    pub count_objects: usize,
    /// `select_count` with a guard: objects examined per second.
    pub count_objects_per_sec: f64,
    /// Objects in the exported table.
    pub export_objects: usize,
    /// Export of that table: objects per second.
    pub export_objects_per_sec: f64,
    /// Growth of the server's resident memory over the export, bytes.
    pub export_rss_growth_bytes: i64,
    /// `/healthz` while heavy selects run on the big table.
    pub health: HealthUnderLoad,
}

/// How `/healthz` answers while as many heavy selects as there are cores
/// walk the big table: the latency a probe (or any other request) sees
/// when long work fills the server.
#[derive(Debug, Serialize)]
pub struct HealthUnderLoad {
    /// Heavy selects running at once.
    pub selects: usize,
    /// Selects answered during the measurement (each walks the table from
    /// its cursor until its deadline or its end).
    pub selects_answered: u64,
    /// Probes sent, one after another.
    pub probes: usize,
    /// Probe latencies, milliseconds.
    pub p50_ms: f64,
    /// Probe latencies, milliseconds.
    pub p99_ms: f64,
    /// Probe latencies, milliseconds.
    pub max_ms: f64,
    /// The target for p99.
    pub target_p99_ms: f64,
    /// Whether p99 met it.
    pub met: bool,
}

/// `/healthz` latency, probe after probe for `duration`, while one heavy
/// select per core runs against the big table in a loop.
fn health_under_selects(
    addr: std::net::SocketAddr,
    duration: std::time::Duration,
) -> HealthUnderLoad {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let selects = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    // A guard that costs something on every object and matches none: each
    // request walks as far as its deadline lets it, then resumes.
    let body = br#"{"match":{"value":{"n":"$n","v":"$v"}},"where":["andalso",["is_integer","$n"],[">",["*","$n",3],-1],["==",["size","$v"],1],["<","$n",0]],"limit":10000}"#;
    let workers: Vec<_> = (0..selects)
        .map(|_| {
            let (stop, answered) = (stop.clone(), answered.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let (status, text) = http(addr, "POST", "/v1/tables/big/select", body);
                    if status != 200 {
                        fail(&format!(
                            "heavy select: {status} {}",
                            String::from_utf8_lossy(&text)
                        ));
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    // Let the selects get going first.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let mut latencies = Vec::new();
    let started = Instant::now();
    while started.elapsed() < duration || latencies.len() < 100 {
        let t = Instant::now();
        let (status, _) = http(addr, "GET", "/healthz", b"");
        if status != 200 {
            fail(&format!("/healthz answered {status} under load"));
        }
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    latencies.sort_by(f64::total_cmp);
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
    let p99 = at(0.99);
    HealthUnderLoad {
        selects,
        selects_answered: answered.load(Ordering::Relaxed),
        probes: latencies.len(),
        p50_ms: at(0.5),
        p99_ms: p99,
        max_ms: latencies.last().copied().unwrap_or(0.0),
        target_p99_ms: 50.0,
        met: p99 < 50.0,
    }
}

/// Runs the rows against `larder` (a server of its own).
pub fn run(opts: &Options, larder: &Proc, scripts: &Path) -> SelectReport {
    let addr = larder.addr;
    let (c, d) = (opts.connections, opts.duration);
    let big = opts.memory_entries;
    let value = value100();
    eprintln!("select rows: loading {big} entries into an ordered_set…");
    create(
        addr,
        serde_json::json!({"name": "big", "type": "ordered_set"}),
    );
    fill_with(addr, "big", big, |i| {
        format!(
            "{{\"key\":\"{}\",\"value\":{{\"n\":{i},\"v\":{value}}}}}",
            key(i)
        )
    });
    let mut rows = Vec::new();

    // Starts leave room for 100 keys after them.
    let starts = big.saturating_sub(100).max(1);
    let scan = Workload::new(
        "GET",
        "/v1/tables/big/entries?start=%K&limit=100",
        None,
        starts,
    )
    .save(scripts, "select-scan-100");
    let select = Workload::new(
        "POST",
        "/v1/tables/big/select",
        Some(r#"{"match":{"key":"$k","value":{"n":"$n"}},"where":[">=","$n",0],"range":{"start":"%K"},"limit":100}"#),
        starts,
    )
    .save(scripts, "select-100");
    let mut row = PairRow::new(
        &format!("select 100 of {big} (ordered_set range, guard)"),
        "scan of 100",
        0.70,
    );
    row.alternate(
        opts.rounds,
        || wrk::run(addr, Some(&scan), "/", c, d).rps,
        || (wrk::run(addr, Some(&select), "/", c, d), 1.0),
    );
    rows.push(row);

    // Multi-get of the first 100 keys, as keys/s, against single GETs of
    // the same keys.
    let keys: Vec<String> = (0..100).map(|i| format!("\"k{i:015}\"")).collect();
    let lookup_body = format!("{{\"keys\":[{}]}}", keys.join(","));
    let lookup = Workload::new("POST", "/v1/tables/big/lookup", Some(&lookup_body), 1)
        .save(scripts, "lookup-100");
    let get = Workload::new("GET", "/v1/tables/big/entries/%K", None, 100.min(big))
        .save(scripts, "lookup-get-1");
    let mut row = PairRow::new("multi-get of 100 keys, keys/s", "100 GETs, keys/s", 1.0);
    row.alternate(
        opts.rounds,
        || wrk::run(addr, Some(&get), "/", c, d).rps,
        || (wrk::run(addr, Some(&lookup), "/", c, d), 100.0),
    );
    rows.push(row);

    // select_count with a guard over 100,000 objects, one request at a time.
    let count_objects = 100_000.min(big);
    create(addr, serde_json::json!({"name": "count", "type": "set"}));
    fill_with(addr, "count", count_objects, |i| {
        format!("{{\"key\":\"{}\",\"value\":{{\"n\":{i}}}}}", key(i))
    });
    let body = br#"{"match":{"value":{"n":"$n"}},"where":["==",["rem","$n",7],0]}"#;
    let started = Instant::now();
    let mut requests = 0u32;
    while started.elapsed() < d || requests < 3 {
        let (status, text) = http(addr, "POST", "/v1/tables/count/select_count", body);
        if status != 200 {
            fail(&format!(
                "select_count: {status} {}",
                String::from_utf8_lossy(&text)
            ));
        }
        requests += 1;
    }
    let count_objects_per_sec =
        count_objects as f64 * f64::from(requests) / started.elapsed().as_secs_f64();

    eprintln!("/healthz while heavy selects run on {big} objects…");
    let health = health_under_selects(addr, d.max(std::time::Duration::from_secs(2)));

    eprintln!("export of {big} objects…");
    let before = larder.rss() as i64;
    let started = Instant::now();
    let (status, body) = http(addr, "GET", "/v1/tables/big/export", b"");
    let took = started.elapsed().as_secs_f64();
    let after = larder.rss() as i64;
    // The body arrives chunked (one chunk a page): count object lines by
    // a member only they have.
    let objects = body
        .windows(16)
        .filter(|w| *w == b"\"expires_at_ms\":")
        .count();
    if status != 200 || objects != big {
        fail(&format!(
            "export: {status}, {objects} object lines for {big} objects"
        ));
    }
    SelectReport {
        rows,
        count_objects,
        count_objects_per_sec,
        export_objects: big,
        export_objects_per_sec: big as f64 / took,
        export_rss_growth_bytes: after - before,
        health,
    }
}
