//! Results: rows with their ratios and targets, printed as a markdown table
//! and saved as JSON.

use serde::Serialize;

use crate::cluster::{ClusterReport, STALENESS_TARGET_MS};
use crate::pair::PairRow;
use crate::select::SelectReport;
use crate::watch::WatchReport;
use crate::wrk::Run;
use crate::Options;

/// A row against the ceiling: every alternation of both servers.
#[derive(Debug, Serialize)]
pub struct Row {
    pub name: String,
    pub ceiling: Vec<Run>,
    pub larder: Vec<Run>,
    pub ceiling_rps: f64,
    pub larder_rps: f64,
    /// larder's throughput over the ceiling's, summed over the rounds.
    pub ratio: f64,
    pub target: f64,
    pub met: bool,
    /// Non-2xx answers and socket errors seen by wrk on larder.
    pub errors: u64,
    pub larder_p99_us: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes_per_fsync: Option<f64>,
}

fn mean_rps(runs: &[Run]) -> f64 {
    runs.iter().map(|r| r.rps).sum::<f64>() / runs.len().max(1) as f64
}

impl Row {
    pub fn new(name: &str, target: f64) -> Row {
        Row {
            name: name.to_owned(),
            ceiling: Vec::new(),
            larder: Vec::new(),
            ceiling_rps: 0.0,
            larder_rps: 0.0,
            ratio: 0.0,
            target,
            met: false,
            errors: 0,
            larder_p99_us: 0.0,
            writes_per_fsync: None,
        }
    }

    /// Computes the summary fields from the runs.
    pub fn finish(&mut self) {
        self.ceiling_rps = mean_rps(&self.ceiling);
        self.larder_rps = mean_rps(&self.larder);
        self.ratio = self.larder_rps / self.ceiling_rps.max(1.0);
        self.errors = self
            .larder
            .iter()
            .map(|r| r.non_2xx + r.socket_errors)
            .sum();
        self.larder_p99_us = self.larder.iter().map(|r| r.p99_us).fold(0.0, f64::max);
        let grouped = self.writes_per_fsync.is_none_or(|w| w >= 20.0);
        self.met = self.ratio >= self.target && self.errors == 0 && grouped;
    }
}

/// A row against Webdis.
#[derive(Debug, Serialize)]
pub struct PeerRow {
    pub name: String,
    pub webdis: Vec<Run>,
    pub larder: Vec<Run>,
    pub webdis_rps: f64,
    pub larder_rps: f64,
    pub ratio: f64,
    pub target: f64,
    pub met: bool,
}

impl PeerRow {
    pub fn new(name: &str, target: f64) -> PeerRow {
        PeerRow {
            name: name.to_owned(),
            webdis: Vec::new(),
            larder: Vec::new(),
            webdis_rps: 0.0,
            larder_rps: 0.0,
            ratio: 0.0,
            target,
            met: false,
        }
    }

    pub fn finish(&mut self) {
        self.webdis_rps = mean_rps(&self.webdis);
        self.larder_rps = mean_rps(&self.larder);
        self.ratio = self.larder_rps / self.webdis_rps.max(1.0);
        self.met = self.ratio >= self.target;
    }
}

/// Resident memory of loaded entries in one persistence mode.
#[derive(Debug, Serialize)]
pub struct MemoryRow {
    pub mode: &'static str,
    pub entries: usize,
    pub raw_bytes: u64,
    /// Growth of resident memory over the raw bytes, after the load.
    pub after_load_ratio: f64,
    /// Resident growth per entry after the load, bytes.
    pub bytes_per_entry: f64,
    /// The same for redis-server given the same SETs, when installed.
    pub redis_bytes_per_entry: Option<f64>,
    /// The same for a restarted server that loaded the entries from disk.
    pub after_restart_ratio: Option<f64>,
    /// Time from start to ready with the entries on disk, after a kill.
    pub startup_ms: Option<u64>,
    /// Time redis-server took to load an RDB of the same entries.
    pub redis_rdb_load_ms: Option<u64>,
}

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub connections: usize,
    pub duration_ms: u64,
    pub rounds: usize,
    pub generator_fixed_rps: f64,
    pub generator_scripted_rps: f64,
    pub generator_ok: bool,
    pub rows: Vec<Row>,
    /// Keyed sync PUTs against plain ones on the same server.
    pub keyed_sync: Option<PairRow>,
    /// A 4-operation transaction against 4 single PUTs, same server.
    pub txn: Option<PairRow>,
    /// A raw 10 KB GET against a JSON GET of a 10 KB string, same table.
    pub raw_get: Option<PairRow>,
    pub peers: Vec<PeerRow>,
    pub selects: Option<SelectReport>,
    pub watch: Option<WatchReport>,
    /// HTTPS against plain HTTP, 429 against 401.
    pub exposed: Vec<PairRow>,
    pub cluster: Option<ClusterReport>,
    pub memory: Vec<MemoryRow>,
    /// Open-loop latency percentiles against the floor's, or larder's own.
    pub latency: Vec<LatencyRow>,
}

/// One latency row: p99 at a fixed rate against a baseline's p99.
#[derive(Debug, Serialize)]
pub struct LatencyRow {
    pub name: String,
    pub baseline: String,
    pub baseline_tail: crate::open_loop::Tail,
    pub larder_tail: crate::open_loop::Tail,
    /// larder's p99 over the baseline's.
    pub ratio: f64,
    /// The most `ratio` may be.
    pub target: f64,
}

/// The measured sections of a run.
pub struct Sections {
    pub rows: Vec<Row>,
    pub keyed_sync: Option<PairRow>,
    pub txn: Option<PairRow>,
    pub raw_get: Option<PairRow>,
    pub peers: Vec<PeerRow>,
    pub selects: Option<SelectReport>,
    pub watch: Option<WatchReport>,
    /// HTTPS against plain HTTP, 429 against 401.
    pub exposed: Vec<PairRow>,
    pub cluster: Option<ClusterReport>,
    pub memory: Vec<MemoryRow>,
    pub latency: Vec<LatencyRow>,
}

/// Memory a durable table may take, as a multiple of the raw bytes.
const MEMORY_TARGET: f64 = 3.0;
/// Longest start-up with the entries on disk, milliseconds.
const STARTUP_TARGET_MS: u64 = 5_000;
/// Bytes per entry of a `none` table over Redis's, at most.
const MEMORY_VS_REDIS_NONE: f64 = 0.9;
/// Bytes per entry of a `periodic` or `sync` table over Redis's, at most.
const MEMORY_VS_REDIS_DURABLE: f64 = 1.2;
/// Start-up after a kill over Redis's RDB load of the same entries, at most.
const STARTUP_VS_REDIS: f64 = 1.5;

impl Report {
    pub fn new(opts: &Options, fixed: Run, scripted: Run, sections: Sections) -> Report {
        let Sections {
            rows,
            keyed_sync,
            txn,
            raw_get,
            peers,
            selects,
            watch,
            exposed,
            cluster,
            memory,
            latency,
        } = sections;
        Report {
            machine: machine(),
            connections: opts.connections,
            duration_ms: opts.duration.as_millis() as u64,
            rounds: opts.rounds,
            generator_fixed_rps: fixed.rps,
            generator_scripted_rps: scripted.rps,
            generator_ok: scripted.rps >= 0.9 * fixed.rps,
            rows,
            keyed_sync,
            txn,
            raw_get,
            peers,
            selects,
            watch,
            exposed,
            cluster,
            memory,
            latency,
        }
    }

    /// Prints the report as markdown tables.
    pub fn print(&self) {
        println!(
            "machine: {}; server and load generator share it.",
            self.machine
        );
        println!(
            "wrk -t1 -c{} for {} ms per run, {} alternations (ceiling, larder) per row.",
            self.connections, self.duration_ms, self.rounds
        );
        println!(
            "generator check on the ceiling: wrk fixed request {:.0} req/s, wrk scripted {:.0} req/s ({:.2}, {})",
            self.generator_fixed_rps,
            self.generator_scripted_rps,
            self.generator_scripted_rps / self.generator_fixed_rps.max(1.0),
            if self.generator_ok { "ok: >= 0.90" } else { "BELOW 0.90" }
        );
        println!();
        println!("| row | ceiling req/s | larder req/s | ratio | target | |");
        println!("|---|---|---|---|---|---|");
        for r in &self.rows {
            let extra = r
                .writes_per_fsync
                .map(|w| format!(", {w:.1} writes/fsync (target >= 20)"))
                .unwrap_or_default();
            let errors = if r.errors > 0 {
                format!(", {} errors", r.errors)
            } else {
                String::new()
            };
            println!(
                "| {} | {:.0} | {:.0} | {:.2} | >= {:.2}{extra}{errors} | {} |",
                r.name,
                r.ceiling_rps,
                r.larder_rps,
                r.ratio,
                r.target,
                mark(r.met)
            );
        }
        if !self.peers.is_empty() {
            println!();
            println!("| peer row | Webdis req/s | larder req/s | ratio | target | |");
            println!("|---|---|---|---|---|---|");
            for p in &self.peers {
                println!(
                    "| {} | {:.0} | {:.0} | {:.2} | >= {:.2} | {} |",
                    p.name,
                    p.webdis_rps,
                    p.larder_rps,
                    p.ratio,
                    p.target,
                    mark(p.met)
                );
            }
        }
        if let Some(keyed) = &self.keyed_sync {
            print_pairs("idempotency row", std::slice::from_ref(keyed));
        }
        if let Some(txn) = &self.txn {
            print_pairs("transaction row", std::slice::from_ref(txn));
        }
        if let Some(raw) = &self.raw_get {
            print_pairs("raw value row", std::slice::from_ref(raw));
        }
        if !self.exposed.is_empty() {
            print_pairs("exposed row", &self.exposed);
        }
        if let Some(selects) = &self.selects {
            print_pairs("select row", &selects.rows);
            println!(
                "select_count with a guard over {} objects: {:.0} objects/s",
                selects.count_objects, selects.count_objects_per_sec
            );
            println!(
                "export of {} objects: {:.0} objects/s, server resident memory {:+.1} MB while streaming",
                selects.export_objects,
                selects.export_objects_per_sec,
                selects.export_rss_growth_bytes as f64 / 1e6
            );
            let h = &selects.health;
            println!(
                "/healthz under {} heavy selects ({} answered): p50 {:.2} ms, p99 {:.2} ms (target < {:.0} ms) {}, max {:.2} ms over {} probes",
                h.selects,
                h.selects_answered,
                h.p50_ms,
                h.p99_ms,
                h.target_p99_ms,
                mark(h.met),
                h.max_ms,
                h.probes
            );
        }
        if let Some(watch) = &self.watch {
            print_pairs("watch row", &watch.rows);
            println!(
                "100 watchers received {:.0} MB/s of events together; streams that ended while read: {}",
                watch.mb_per_sec_100, watch.ended_streams
            );
            println!(
                "{} idle watchers: server resident memory {:+.1} MB ({:.1} KB each)",
                watch.idle_watchers,
                watch.idle_rss_growth_bytes as f64 / 1e6,
                watch.idle_rss_growth_bytes as f64 / 1e3 / watch.idle_watchers as f64
            );
        }
        if let Some(cluster) = &self.cluster {
            print_cluster(cluster);
        }
        if !self.latency.is_empty() {
            print_latency(&self.latency);
        }
        if !self.memory.is_empty() {
            print_against_redis(&self.memory);
            println!();
            println!(
                "| memory, {} entries | after load | after restart | start-up | |",
                self.memory[0].entries
            );
            println!("|---|---|---|---|---|");
            for m in &self.memory {
                let durable = m.mode != "none";
                let met = !durable
                    || (m.after_load_ratio <= MEMORY_TARGET
                        && m.after_restart_ratio.is_none_or(|r| r <= MEMORY_TARGET)
                        && m.startup_ms.is_none_or(|t| t < STARTUP_TARGET_MS));
                println!(
                    "| {} | {:.2}x raw | {} | {} | {} |",
                    m.mode,
                    m.after_load_ratio,
                    m.after_restart_ratio
                        .map_or("-".to_owned(), |r| format!("{r:.2}x raw")),
                    m.startup_ms.map_or("-".to_owned(), |t| format!("{t} ms")),
                    if durable { mark(met) } else { "(no target)" }
                );
            }
        }
    }
}

/// Open-loop percentiles, microseconds, and the p99 ratio with its target.
fn print_latency(rows: &[LatencyRow]) {
    println!();
    println!("| latency, 16 connections, fixed rate | req/s | baseline | p50 / p99 / p99.9 | larder p50 / p99 / p99.9 | p99 ratio | target | |");
    println!("|---|---|---|---|---|---|---|---|");
    let pcts = |t: &crate::open_loop::Tail| {
        let mut s = format!("{:.0} / {:.0} / {:.0} µs", t.p50_us, t.p99_us, t.p999_us);
        if t.errors > 0 {
            s.push_str(&format!(", {} errors", t.errors));
        }
        s
    };
    for r in rows {
        println!(
            "| {} | {:.0} | {} | {} | {} | {:.2} | <= {:.1} | {} |",
            r.name,
            r.larder_tail.rate,
            r.baseline,
            pcts(&r.baseline_tail),
            pcts(&r.larder_tail),
            r.ratio,
            r.target,
            mark(r.ratio <= r.target && r.larder_tail.errors == 0),
        );
    }
}

/// Bytes per entry against Redis (none ≤ 0.9x, durable ≤ 1.2x) and
/// start-up after a kill against Redis loading its RDB (≤ 1.5x).
fn print_against_redis(rows: &[MemoryRow]) {
    if rows.iter().all(|m| m.redis_bytes_per_entry.is_none()) {
        return;
    }
    println!();
    println!("| {} entries | larder B/entry | Redis B/entry | ratio | target | start-up | Redis RDB load | ratio | target |", rows[0].entries);
    println!("|---|---|---|---|---|---|---|---|---|");
    for m in rows {
        let Some(redis) = m.redis_bytes_per_entry else {
            continue;
        };
        let target = if m.mode == "none" {
            MEMORY_VS_REDIS_NONE
        } else {
            MEMORY_VS_REDIS_DURABLE
        };
        let ratio = m.bytes_per_entry / redis.max(1.0);
        let (startup, load, start_ratio, start_mark) = match (m.startup_ms, m.redis_rdb_load_ms) {
            (Some(s), Some(r)) => {
                let q = s as f64 / r.max(1) as f64;
                (
                    format!("{s} ms"),
                    format!("{r} ms"),
                    format!("{q:.2}"),
                    format!("<= {STARTUP_VS_REDIS:.1} {}", mark(q <= STARTUP_VS_REDIS)),
                )
            }
            _ => ("-".into(), "-".into(), "-".into(), "-".into()),
        };
        println!(
            "| {} | {:.0} | {redis:.0} | {ratio:.2} | <= {target:.1} {} | {startup} | {load} | {start_ratio} | {start_mark} |",
            m.mode,
            m.bytes_per_entry,
            mark(ratio <= target),
        );
    }
}

fn print_pairs(title: &str, rows: &[PairRow]) {
    println!();
    println!("| {title} | baseline | baseline req/s | larder req/s | ratio | target | |");
    println!("|---|---|---|---|---|---|---|");
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    for r in rows {
        let errors = if r.errors > 0 {
            format!(", {} errors", r.errors)
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.2} | >= {:.2}{errors} | {} |",
            r.name,
            r.baseline,
            mean(&r.baseline_rps),
            mean(&r.larder_rps),
            r.ratio,
            r.target,
            mark(r.met)
        );
    }
}

fn print_cluster(cluster: &ClusterReport) {
    print_pairs("cluster row", &cluster.rows);
    if !cluster.staleness.is_empty() {
        println!();
        println!("| staleness, write on node A until a GET on node B sees it | samples | p50 | p99 | max | |");
        println!("|---|---|---|---|---|---|");
        for s in &cluster.staleness {
            println!(
                "| {} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {} |",
                s.condition,
                s.samples,
                s.p50_ms,
                s.p99_ms,
                s.max_ms,
                mark(s.p99_ms < STALENESS_TARGET_MS)
            );
        }
    }
}

fn mark(met: bool) -> &'static str {
    if met {
        "met"
    } else {
        "MISSED"
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores, {cpu}")
}
