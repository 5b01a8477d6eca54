//! `larder-bench`: larder measured from outside, against the ceiling the
//! HTTP stack itself sets on the same machine.
//!
//! The ceiling is `larder-ceiling`, the floor of HTTP work: a minimal
//! hyper server with no router, middleware or state, answering the same
//! requests with bodies of the same size. Every row runs
//! the same wrk workload against the ceiling and against larder, alternating
//! (A B A B …) so that drift of a shared, noisy machine cancels, and reports
//! larder's throughput as a ratio of the ceiling's. When Redis and Webdis are
//! installed, peer rows compare larder with Webdis on the same keys and
//! value sizes. Memory rows load 1M entries into `none`, `periodic` and
//! `sync` tables and read the server's resident memory, after the load and
//! after a restart; the restart of the persisted table is timed.
//!
//! Absolute numbers on a shared two-core machine are noise; ratios are the
//! signal.

mod cluster;
mod exposed;
mod open_loop;
mod pair;
mod procs;
mod redis;
mod report;
mod select;
mod watch;
mod wrk;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use procs::{fail, http, metric, Proc};
use report::{MemoryRow, PeerRow, Report, Row, Sections};
use wrk::Workload;

/// Benchmark options.
#[derive(Debug, Parser)]
#[command(
    name = "larder-bench",
    about = "Benchmark larder against a minimal hyper server and Webdis"
)]
struct Options {
    /// How long each wrk run lasts, e.g. `5s` or `1500ms`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Alternations per row: each round runs the ceiling, then larder.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Keep-alive connections of wrk.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Keys in the GET, PUT and counter tables.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Entries loaded for the memory rows and the start-up measurement.
    #[arg(long, default_value_t = 1_000_000)]
    memory_entries: usize,
    /// Skip the memory and start-up rows.
    #[arg(long)]
    skip_memory: bool,
    /// Skip the cluster rows (which start a PostgreSQL of their own).
    #[arg(long)]
    skip_cluster: bool,
    /// Skip the select and multi-get rows (which load their own table of
    /// `--memory-entries` objects).
    #[arg(long)]
    skip_select: bool,
    /// Skip the change-stream rows.
    #[arg(long)]
    skip_watch: bool,
    /// Skip the rows of a server exposed beyond loopback (HTTPS against
    /// plain HTTP, 429 against 401).
    #[arg(long)]
    skip_exposed: bool,
    /// Do not install missing peers (redis-server, webdis); their rows are
    /// then left out. The smoke test runs this way; a full run installs
    /// them with apt-get.
    #[arg(long)]
    no_peer_install: bool,
    /// Run only the rows whose name contains this text (and no peer or
    /// memory rows): for measuring one change quickly.
    #[arg(long)]
    only: Option<String>,
    /// The `larder` binary; default: next to this one.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// The `larder-ceiling` binary; default: next to this one.
    #[arg(long)]
    ceiling_bin: Option<PathBuf>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    out: PathBuf,
}

/// A 100-byte JSON value shaped like what callers store: an object with a
/// number, a boolean, an array and strings. A plain JSON string would take
/// the server's string fast path, which real records do not.
fn value100() -> String {
    let head = r#"{"id":4217,"active":true,"tags":["a","b"],"name":""#;
    let pad = 100 - head.len() - r#""}"#.len();
    format!("{head}{}\"}}", "v".repeat(pad))
}

/// A 16-byte key.
pub fn key(i: usize) -> String {
    format!("k{i:015}")
}

fn create(addr: SocketAddr, body: serde_json::Value) {
    let (status, text) = http(addr, "POST", "/v1/tables", body.to_string().as_bytes());
    if status != 201 {
        fail(&format!(
            "creating a table: {status} {}",
            String::from_utf8_lossy(&text)
        ));
    }
}

/// Bulk-inserts keys `0..n` with 100-byte values, in batches under the
/// default body limit.
fn fill(addr: SocketAddr, table: &str, n: usize) {
    let value = value100();
    fill_with(addr, table, n, |i| {
        format!("{{\"key\":\"{}\",\"value\":{value}}}", key(i))
    });
}

/// Bulk-inserts the objects `object(0..n)` (JSON text), in batches under
/// the default body limit.
fn fill_with(addr: SocketAddr, table: &str, n: usize, object: impl Fn(usize) -> String) {
    for start in (0..n).step_by(4000) {
        let end = (start + 4000).min(n);
        let mut body = String::with_capacity((end - start) * 140 + 2);
        body.push('[');
        for i in start..end {
            if i > start {
                body.push(',');
            }
            body.push_str(&object(i));
        }
        body.push(']');
        let path = format!("/v1/tables/{table}/entries");
        let (status, text) = http(addr, "POST", &path, body.as_bytes());
        if status != 200 {
            fail(&format!(
                "filling {table}: {status} {}",
                String::from_utf8_lossy(&text)
            ));
        }
    }
}

/// One row: a workload, its target ratio, whether it counts fsyncs, and
/// its connections when not `--connections`.
struct Spec {
    name: &'static str,
    target: f64,
    workload: Workload,
    sync: bool,
    connections: Option<usize>,
}

fn specs(keys: usize) -> Vec<Spec> {
    let v = value100();
    let row = |name, target, method, path: &str, body: Option<&str>, sync| Spec {
        name,
        target,
        workload: Workload::new(method, path, body, keys),
        sync,
        connections: None,
    };
    vec![
        row("noop (middleware only)", 0.90, "GET", "/noop", None, false),
        row(
            "GET hit, 10k keys, 100-byte values",
            0.85,
            "GET",
            "/v1/tables/hits/entries/%K",
            None,
            false,
        ),
        row(
            "PUT replace, none",
            0.80,
            "PUT",
            "/v1/tables/none/entries/%K",
            Some(&v),
            false,
        ),
        row(
            "PUT replace, periodic 1000 ms",
            0.75,
            "PUT",
            "/v1/tables/periodic/entries/%K",
            Some(&v),
            false,
        ),
        row(
            "PUT replace, sync",
            0.50,
            "PUT",
            "/v1/tables/sync/entries/%K",
            Some(&v),
            true,
        ),
        // More writers per fsync: group commit's other operating point.
        Spec {
            connections: Some(256),
            ..row(
                "PUT replace, sync, 256 connections",
                0.70,
                "PUT",
                "/v1/tables/sync/entries/%K",
                Some(&v),
                true,
            )
        },
        row(
            "counter, 10k keys",
            0.80,
            "POST",
            "/v1/tables/counters/entries/%C/counter",
            Some("{\"default\":0}"),
            false,
        ),
        row(
            "counter, one hot key",
            0.60,
            "POST",
            "/v1/tables/counters/entries/hot/counter",
            Some("{\"default\":0}"),
            false,
        ),
        row(
            "scan 100, ordered_set",
            0.40,
            "GET",
            "/v1/tables/ordered/entries?start=%K&limit=100",
            None,
            false,
        ),
    ]
}

fn main() {
    let opts = Options::parse();
    wrk::ensure_installed();
    if opts.only.is_none() && !opts.no_peer_install {
        procs::ensure_peers();
    }
    let server = procs::sibling("larder", opts.server_bin.as_ref());
    let ceiling_bin = procs::sibling("larder-ceiling", opts.ceiling_bin.as_ref());
    let dir = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("temp dir: {e}")));
    let scripts = dir.path().join("scripts");
    std::fs::create_dir_all(&scripts).unwrap_or_else(|e| fail(&format!("{e}")));
    let (c, d) = (opts.connections, opts.duration);

    let ceiling = procs::start_ceiling(&ceiling_bin);
    let larder = procs::start_larder(&server, &dir.path().join("data"), &[]);
    let addr = larder.addr;
    for (name, body) in [
        ("hits", serde_json::json!({"name": "hits"})),
        ("none", serde_json::json!({"name": "none"})),
        (
            "periodic",
            serde_json::json!({"name": "periodic", "persistence": "periodic", "auto_save_ms": 1000}),
        ),
        (
            "sync",
            serde_json::json!({"name": "sync", "persistence": "sync"}),
        ),
        ("counters", serde_json::json!({"name": "counters"})),
        (
            "ordered",
            serde_json::json!({"name": "ordered", "type": "ordered_set"}),
        ),
    ] {
        create(addr, body);
        if name != "counters" {
            fill(addr, name, opts.keys);
        }
    }

    // The generator check: wrk with a Lua script against wrk with a fixed
    // request, both on the ceiling's GET path.
    let get_hit = Workload::new("GET", "/v1/tables/hits/entries/%K", None, opts.keys)
        .save(&scripts, "generator-check");
    let fixed = wrk::run(
        ceiling.addr,
        None,
        &format!("/v1/tables/hits/entries/{}", key(0)),
        c,
        d,
    );
    let scripted = wrk::run(ceiling.addr, Some(&get_hit), "/", c, d);
    eprintln!(
        "generator check on the ceiling: wrk with a fixed request {:.0} req/s, scripted {:.0} req/s ({:.2})",
        fixed.rps,
        scripted.rps,
        scripted.rps / fixed.rps.max(1.0)
    );

    let mut rows = Vec::new();
    let chosen = |name: &str| opts.only.as_deref().is_none_or(|o| name.contains(o));
    for spec in specs(opts.keys).into_iter().filter(|s| chosen(s.name)) {
        let script = spec.workload.save(&scripts, &slug(spec.name));
        let mut row = Row::new(spec.name, spec.target);
        let (mut writes, mut flushes) = (0.0, 0.0);
        let c = spec.connections.unwrap_or(c);
        for round in 0..opts.rounds {
            eprintln!("{} (round {}/{})…", spec.name, round + 1, opts.rounds);
            row.ceiling
                .push(wrk::run(ceiling.addr, Some(&script), "/", c, d));
            let before = sync_counts(addr, spec.sync);
            row.larder.push(wrk::run(addr, Some(&script), "/", c, d));
            let after = sync_counts(addr, spec.sync);
            writes += after.0 - before.0;
            flushes += after.1 - before.1;
        }
        if spec.sync {
            row.writes_per_fsync = Some(if flushes > 0.0 { writes / flushes } else { 0.0 });
        }
        row.finish();
        rows.push(row);
    }
    // Latency at a fixed rate, open loop: against the floor at 50% and
    // 70% of its most GETs per second, and a 90/10 GET/PUT mix on a
    // periodic table against larder's own pure GETs.
    let latency = if chosen("latency") {
        latency_rows(&opts, ceiling.addr, addr, fixed.rps.max(scripted.rps))
    } else {
        Vec::new()
    };
    drop(ceiling);

    // Exactly-once retries on a sync table cost the record and its check:
    // keyed PUTs (a fresh key each) against plain ones, same table, same
    // server, alternating. The plain ones carry a fresh value of a header
    // larder ignores, so wrk formats every request of both as it sends it.
    let keyed_sync = chosen("sync PUT with Idempotency-Key").then(|| {
        let v = value100();
        let path = "/v1/tables/sync/entries/%K";
        let plain = Workload::fresh_header("PUT", path, Some(&v), opts.keys, "X-Trace-Id")
            .save(&scripts, "sync-put-plain");
        let keyed = Workload::keyed("PUT", "/v1/tables/sync/entries/%K", Some(&v), opts.keys)
            .save(&scripts, "sync-put-keyed");
        let mut row = pair::PairRow::new("sync PUT with Idempotency-Key", "sync PUT without", 0.90);
        row.alternate(
            opts.rounds,
            || wrk::run(addr, Some(&plain), "/", c, d).rps,
            || (wrk::run(addr, Some(&keyed), "/", c, d), 1.0),
        );
        row
    });

    // A transaction of 4 puts against 4 single PUTs of the same values on
    // the same in-memory table: transactions per second against PUTs per
    // second divided by 4, alternating.
    let txn = chosen("4-op transaction").then(|| {
        let v = value100();
        let put = Workload::new("PUT", "/v1/tables/none/entries/%K", Some(&v), opts.keys)
            .save(&scripts, "txn-single-puts");
        let ops: Vec<String> = ["a", "b", "c", "d"]
            .iter()
            .map(|s| format!(r#"{{"op":"put","key":"%K-{s}","value":{v}}}"#))
            .collect();
        let body = format!(r#"{{"then":[{}]}}"#, ops.join(","));
        let four = Workload::new("POST", "/v1/tables/none/txn", Some(&body), opts.keys)
            .save(&scripts, "txn-four-puts");
        let mut row = pair::PairRow::new("4-op transaction (x4)", "4 single PUTs", 1.0);
        row.alternate(
            opts.rounds,
            || wrk::run(addr, Some(&put), "/", c, d).rps,
            || (wrk::run(addr, Some(&four), "/", c, d), 4.0),
        );
        row
    });

    // A raw value's GET (bytes out of base64) against a JSON GET of a
    // string of the same length, on one `"values": "any"` table: the
    // same fixed key each time, alternating.
    let raw_get = chosen("raw GET of a 10 KB body").then(|| {
        create(addr, serde_json::json!({"name": "raw", "values": "any"}));
        // 10,242 bytes: 3,414 times "abc", whose base64 is "YWJj".
        let text = "abc".repeat(3414);
        let raw = format!(
            r#"{{"$bytes":"{}","content_type":"text/plain"}}"#,
            "YWJj".repeat(3414)
        );
        for (key, body) in [("raw", raw), ("json", format!("\"{text}\""))] {
            let path = format!("/v1/tables/raw/entries/{key}");
            let (status, _) = http(addr, "PUT", &path, body.as_bytes());
            if status != 201 {
                fail(&format!("storing the 10 KB {key} value: {status}"));
            }
        }
        let mut row =
            pair::PairRow::new("raw GET of a 10 KB body", "JSON GET of a 10 KB string", 1.0);
        row.alternate(
            opts.rounds,
            || wrk::run(addr, None, "/v1/tables/raw/entries/json", c, d).rps,
            || {
                (
                    wrk::run(addr, None, "/v1/tables/raw/entries/raw", c, d),
                    1.0,
                )
            },
        );
        row
    });

    let peers = match procs::start_webdis(dir.path()).filter(|_| opts.only.is_none()) {
        Some(webdis) => peer_rows(&opts, addr, &webdis.http, &scripts),
        None => {
            eprintln!("Webdis or Redis not installed: no peer rows");
            Vec::new()
        }
    };
    drop(larder);

    let selects = if opts.skip_select
        || opts
            .only
            .as_deref()
            .is_some_and(|o| !"select multi-get".contains(o))
    {
        None
    } else {
        let larder = procs::start_larder(&server, &dir.path().join("select"), &[]);
        Some(select::run(&opts, &larder, &scripts))
    };

    let watch = if opts.skip_watch
        || opts
            .only
            .as_deref()
            .is_some_and(|o| !"PUT with watchers".contains(o))
    {
        None
    } else {
        let larder = procs::start_larder(&server, &dir.path().join("watch"), &[]);
        Some(watch::run(&opts, &larder, &scripts))
    };

    let exposed = if opts.skip_exposed
        || opts
            .only
            .as_deref()
            .is_some_and(|o| !"GET hit over HTTPS 429 answers".contains(o))
    {
        Vec::new()
    } else {
        exposed::run(&opts, &server, dir.path(), &scripts)
    };

    let cluster = if opts.skip_cluster {
        None
    } else {
        cluster::run(&opts, &server, dir.path(), &scripts)
    };

    let memory = if opts.skip_memory || opts.only.is_some() {
        Vec::new()
    } else {
        memory_rows(&server, dir.path(), opts.memory_entries)
    };

    let report = Report::new(
        &opts,
        fixed,
        scripted,
        Sections {
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
        },
    );
    report.print();
    let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
    if let Err(e) = std::fs::write(&opts.out, json) {
        fail(&format!("cannot write {}: {e}", opts.out.display()));
    }
    eprintln!("results written to {}", opts.out.display());
}

fn slug(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// Sync writes made durable and write-back rounds so far (zeros if `sync`
/// is false, to spare a scrape).
fn sync_counts(addr: SocketAddr, sync: bool) -> (f64, f64) {
    if !sync {
        return (0.0, 0.0);
    }
    (
        metric(addr, "larder_sync_writes_total"),
        metric(addr, "larder_writeback_rounds_total"),
    )
}

/// The open-loop rows (see [`open_loop`]): 16 connections, each run
/// `rounds x duration` long.
fn latency_rows(
    opts: &Options,
    floor: SocketAddr,
    larder: SocketAddr,
    floor_max: f64,
) -> Vec<report::LatencyRow> {
    const CONNECTIONS: usize = 16;
    let d = opts.duration * opts.rounds.max(1) as u32;
    let get_path = "/v1/tables/hits/entries/%K";
    let gets = Arc::new(open_loop::requests(
        "GET", get_path, None, opts.keys, 2000, key,
    ));
    let v = value100();
    let periodic = "/v1/tables/periodic/entries/%K";
    let mut mix = open_loop::requests("GET", periodic, None, opts.keys, 1800, key);
    mix.extend(open_loop::requests(
        "PUT",
        periodic,
        Some(&v),
        opts.keys,
        200,
        key,
    ));
    let mix = Arc::new(mix);
    let row = |name: String, baseline: &str, b: open_loop::Tail, l: open_loop::Tail, target| {
        report::LatencyRow {
            name,
            baseline: baseline.to_owned(),
            ratio: l.p99_us / b.p99_us.max(1.0),
            baseline_tail: b,
            larder_tail: l,
            target,
        }
    };
    let mut rows = Vec::new();
    let mut larder_get_50 = None;
    for (share, target) in [(0.5, 1.5), (0.7, 2.0)] {
        let rate = floor_max * share;
        eprintln!(
            "latency: GET at {:.0}% of the floor ({rate:.0} req/s)…",
            share * 100.0
        );
        let b = open_loop::run(floor, &gets, rate, CONNECTIONS, d);
        let l = open_loop::run(larder, &gets, rate, CONNECTIONS, d);
        if share == 0.5 {
            larder_get_50 = Some(l);
        }
        let name = format!("GET hit at {:.0}% of the floor's max", share * 100.0);
        rows.push(row(name, "floor GET", b, l, target));
    }
    if let Some(get) = larder_get_50 {
        eprintln!("latency: 90% GET / 10% PUT on a periodic table…");
        let l = open_loop::run(larder, &mix, get.rate, CONNECTIONS, d);
        let name = "90% GET / 10% PUT, periodic, at 50%".to_owned();
        rows.push(row(name, "larder pure GET at 50%", get, l, 2.0));
    }
    rows
}

/// larder against Webdis on GET, SET and INCR, same keys and value size.
fn peer_rows(opts: &Options, larder: SocketAddr, webdis: &Proc, scripts: &Path) -> Vec<PeerRow> {
    let (c, d) = (opts.connections, opts.duration);
    let v = value100();
    // Webdis needs its keys too: SET each through it.
    let fill_set =
        Workload::new("PUT", "/SET/%K", Some(&v), opts.keys).save(scripts, "webdis-fill");
    let _ = wrk::run(webdis.addr, Some(&fill_set), "/", c, Duration::from_secs(2));
    let pairs = [
        (
            "GET",
            "/v1/tables/hits/entries/%K",
            None,
            "/GET/%K",
            None,
            1.3,
        ),
        (
            "PUT vs SET",
            "/v1/tables/none/entries/%K",
            Some(v.as_str()),
            "/SET/%K",
            Some(v.as_str()),
            1.3,
        ),
        (
            "counter vs INCR",
            "/v1/tables/counters/entries/%C/counter",
            Some("{\"default\":0}"),
            "/INCR/%C",
            None,
            1.3,
        ),
    ];
    let mut rows = Vec::new();
    for (name, lpath, lbody, wpath, wbody, target) in pairs {
        let method = if lbody.is_some() && lpath.ends_with("counter") {
            "POST"
        } else if lbody.is_some() {
            "PUT"
        } else {
            "GET"
        };
        let wmethod = if wbody.is_some() { "PUT" } else { "GET" };
        let ls = Workload::new(method, lpath, lbody, opts.keys)
            .save(scripts, &format!("peer-larder-{}", slug(name)));
        let ws = Workload::new(wmethod, wpath, wbody, opts.keys)
            .save(scripts, &format!("peer-webdis-{}", slug(name)));
        let mut row = PeerRow::new(name, target);
        for round in 0..opts.rounds {
            eprintln!("peer {name} (round {}/{})…", round + 1, opts.rounds);
            row.webdis.push(wrk::run(webdis.addr, Some(&ws), "/", c, d));
            row.larder.push(wrk::run(larder, Some(&ls), "/", c, d));
        }
        row.finish();
        rows.push(row);
    }
    rows
}

/// Resident memory of 1M entries (16-byte keys, 100-byte values) in each
/// persistence mode, after the load and after a kill and restart, against
/// Redis holding the same keys and values when it is installed.
fn memory_rows(server: &Path, dir: &Path, entries: usize) -> Vec<MemoryRow> {
    let raw = (entries * (16 + 100)) as f64;
    let value = value100();
    let peer = redis::measure(dir, entries, key, &value);
    if peer.is_none() {
        eprintln!("redis-server not installed: memory and start-up rows without Redis");
    }
    let mut rows = Vec::new();
    for mode in ["none", "periodic", "sync"] {
        eprintln!("memory: {entries} entries, {mode}…");
        let data = dir.join(format!("memory-{mode}"));
        let larder = procs::start_larder(server, &data, &[]);
        let mut body = serde_json::json!({"name": "m", "persistence": mode});
        if mode == "periodic" {
            body["auto_save_ms"] = serde_json::json!(1000);
        }
        create(larder.addr, body);
        let empty = larder.settled_rss();
        fill(larder.addr, "m", entries);
        if mode != "none" {
            let _ = http(larder.addr, "POST", "/v1/tables/m/sync", b"");
        }
        let loaded = larder.settled_rss();
        let grown = loaded.saturating_sub(empty) as f64;
        let mut row = MemoryRow {
            mode,
            entries,
            raw_bytes: raw as u64,
            after_load_ratio: grown / raw,
            bytes_per_entry: grown / entries as f64,
            redis_bytes_per_entry: peer.map(|p| p.bytes_per_entry),
            after_restart_ratio: None,
            startup_ms: None,
            redis_rdb_load_ms: None,
        };
        if mode != "none" {
            // Killed (the entries are on disk: the sync above), then
            // timed from the start until /readyz answers 200.
            drop(larder);
            let started = Instant::now();
            let again = procs::start_larder(server, &data, &[]);
            row.startup_ms = Some(started.elapsed().as_millis() as u64);
            row.redis_rdb_load_ms = peer.map(|p| p.rdb_load_ms);
            let fresh = procs::start_larder(server, &dir.join(format!("memory-{mode}-empty")), &[]);
            create(
                fresh.addr,
                serde_json::json!({"name": "m", "persistence": mode}),
            );
            let baseline = fresh.settled_rss();
            row.after_restart_ratio =
                Some(again.settled_rss().saturating_sub(baseline) as f64 / raw);
        }
        rows.push(row);
    }
    rows
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_value_is_a_100_byte_json_object() {
        let v = super::value100();
        assert_eq!(v.len(), 100);
        let parsed: serde_json::Value = serde_json::from_str(&v).unwrap();
        assert!(parsed.is_object(), "{v}");
    }
}
