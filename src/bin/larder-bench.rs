//! `larder-bench`: drives a real `larder` process with a keep-alive load
//! generator and reports every operation as a ratio to a no-op route
//! measured in the same run.
//!
//! The server is the release `larder` binary next to this one (built first
//! if missing), started as a child process on a temporary data directory.
//! The generator speaks HTTP/1.1 with hyper over `--connections` persistent
//! connections. Both share the machine, so absolute numbers say little; the
//! ratios against `noop` are the signal.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::Serialize;

/// Benchmark options.
#[derive(Debug, Parser)]
#[command(
    name = "larder-bench",
    about = "Benchmark larder against its own no-op route"
)]
struct Options {
    /// How long each row runs, e.g. `10s` or `1500ms`.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Warm-up before the first row.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Keep-alive connections of the load generator.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Keys in the GET/PUT tables.
    #[arg(long, default_value_t = 100_000)]
    keys: usize,
    /// Entries for the memory measurement.
    #[arg(long, default_value_t = 1_000_000)]
    memory_entries: usize,
    /// Persisted entries for the start-up measurement.
    #[arg(long, default_value_t = 1_000_000)]
    startup_entries: usize,
    /// The `larder` binary to run; default: next to this one.
    #[arg(long)]
    server_bin: Option<PathBuf>,
    /// Where to write the results as JSON.
    #[arg(long, default_value = "bench-results.json")]
    out: PathBuf,
}

/// One row of results.
#[derive(Debug, Clone, Serialize)]
struct Row {
    name: String,
    requests: u64,
    errors: u64,
    rps: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
    ratio: f64,
    /// Sync rows: sync writes that shared one fsync, on average.
    #[serde(skip_serializing_if = "Option::is_none")]
    writes_per_fsync: Option<f64>,
}

/// Everything the run measured.
#[derive(Debug, Serialize)]
struct Report {
    machine: String,
    connections: usize,
    duration_s: f64,
    rows: Vec<Row>,
    memory_entries: usize,
    resident_bytes_per_entry: f64,
    raw_bytes_per_entry: f64,
    startup_entries: usize,
    startup_ms: u64,
    targets: Vec<(String, bool)>,
}

type Sender = SendRequest<Full<Bytes>>;

/// A running server process.
struct Server {
    child: Child,
    addr: SocketAddr,
    logs: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Server {
    fn start(bin: &Path, data: &Path) -> Server {
        let mut child = Command::new(bin)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--data-dir",
            ])
            .arg(data)
            .args(["--max-concurrent-requests", "100000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| fail(&format!("cannot start {}: {e}", bin.display())));
        let Some(stdout) = child.stdout.take() else {
            fail("no stdout from the server");
        };
        let (tx, rx) = mpsc::channel();
        let logs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("larder listening"))
                    {
                        if let Some(addr) = v["addr"].as_str().and_then(|a| a.parse().ok()) {
                            let _ = tx.send(addr);
                        }
                    }
                }
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| fail("the server did not report its address"));
        Server { child, addr, logs }
    }

    fn resident_bytes(&self) -> u64 {
        let statm =
            std::fs::read_to_string(format!("/proc/{}/statm", self.child.id())).unwrap_or_default();
        statm
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u64>().ok())
            .unwrap_or(0)
            * 4096
    }

    fn terminate(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("larder-bench: {msg}");
    std::process::exit(1)
}

async fn connect(addr: SocketAddr) -> Sender {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| fail(&format!("connect: {e}")));
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .unwrap_or_else(|e| fail(&format!("handshake: {e}")));
    tokio::spawn(conn);
    sender
}

/// Sends one request and reads the whole answer; returns the status.
async fn send(sender: &mut Sender, method: Method, path: &str, body: Bytes) -> Option<u16> {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bench")
        .body(Full::new(body))
        .ok()?;
    sender.ready().await.ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    resp.into_body().collect().await.ok()?;
    Some(status)
}

/// Deterministic per-connection randomness.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(1.0) over ranks by inverse CDF.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += 1.0 / k as f64;
                acc
            })
            .collect();
        cdf.iter_mut().for_each(|c| *c /= acc);
        Zipf(cdf)
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|c| *c < u).min(self.0.len() - 1)
    }
}

/// What one request of a row looks like.
type Workload = Arc<dyn Fn(&mut Rng) -> (Method, String, Bytes) + Send + Sync>;

/// Which statuses count as success for a row.
type Accept = fn(u16) -> bool;

fn key(i: usize) -> String {
    format!("k{i:015}")
}

fn value100() -> Bytes {
    Bytes::from(format!("\"{}\"", "v".repeat(98)))
}

/// Runs `work` on every connection for `duration`; returns a row (ratio 0).
async fn run_row(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    name: &str,
    work: Workload,
    ok: fn(u16) -> bool,
) -> Row {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for c in 0..connections {
        let work = work.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(addr).await;
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((c as u64 + 1) * 0x1000_0001));
            let mut latencies: Vec<u32> = Vec::with_capacity(1 << 16);
            let mut errors = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let (method, path, body) = work(&mut rng);
                let started = Instant::now();
                match send(&mut sender, method, &path, body).await {
                    Some(status) if ok(status) => {
                        latencies.push(started.elapsed().as_micros().min(u32::MAX as u128) as u32)
                    }
                    Some(_) => errors += 1,
                    None => {
                        errors += 1;
                        sender = connect(addr).await;
                    }
                }
            }
            (latencies, errors)
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            all.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> u64 {
        if all.is_empty() {
            0
        } else {
            all[((all.len() as f64 * p) as usize).min(all.len() - 1)] as u64
        }
    };
    Row {
        name: name.to_owned(),
        requests: all.len() as u64,
        errors,
        rps: all.len() as f64 / elapsed,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
        ratio: 0.0,
        writes_per_fsync: None,
    }
}

async fn post_json(addr: SocketAddr, path: &str, body: String) -> u16 {
    let mut s = connect(addr).await;
    send(&mut s, Method::POST, path, Bytes::from(body))
        .await
        .unwrap_or(0)
}

async fn create(addr: SocketAddr, body: serde_json::Value) {
    let status = post_json(addr, "/v1/tables", body.to_string()).await;
    if status != 201 {
        fail(&format!("creating {body} answered {status}"));
    }
}

/// Bulk-loads `n` keys of 100-byte values into `table`, 1000 per request.
async fn fill(addr: SocketAddr, table: &str, n: usize) {
    let value = String::from_utf8_lossy(&value100()).into_owned();
    let mut sender = connect(addr).await;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let items: Vec<String> = chunk
            .iter()
            .map(|i| format!("{{\"key\":\"{}\",\"value\":{value}}}", key(*i)))
            .collect();
        let body = format!("[{}]", items.join(","));
        let status = send(
            &mut sender,
            Method::POST,
            &format!("/v1/tables/{table}/entries"),
            Bytes::from(body),
        )
        .await;
        if status != Some(200) {
            fail(&format!("bulk load into {table} answered {status:?}"));
        }
    }
}

/// A counter's value from `/metrics`.
async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let mut s = connect(addr).await;
    let req = Request::builder()
        .uri("/metrics")
        .header("host", "bench")
        .body(Full::new(Bytes::new()));
    let Ok(req) = req else { return 0.0 };
    let Ok(resp) = s.send_request(req).await else {
        return 0.0;
    };
    let Ok(body) = resp.into_body().collect().await else {
        return 0.0;
    };
    let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

async fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut s = connect(addr).await;
        if send(&mut s, Method::GET, "/readyz", Bytes::new()).await == Some(200) {
            return;
        }
        if Instant::now() > deadline {
            fail("the server did not become ready");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn server_binary(opts: &Options) -> PathBuf {
    if let Some(bin) = &opts.server_bin {
        return bin.clone();
    }
    let sibling = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("larder")))
        .unwrap_or_else(|| PathBuf::from("larder"));
    if !sibling.exists() {
        eprintln!("building the release server first…");
        let built = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bin", "larder"])
            .status();
        if !built.is_ok_and(|s| s.success()) {
            fail("cargo build --release --bin larder failed");
        }
    }
    sibling
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cores} cores ({cpu}); server and load generator share them")
}

async fn run(opts: Options) {
    let bin = server_binary(&opts);
    let dir = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("temp dir: {e}")));
    let server = Server::start(&bin, &dir.path().join("data"));
    let addr = server.addr;
    wait_ready(addr).await;

    let n = opts.keys;
    create(addr, serde_json::json!({"name": "hits", "type": "set"})).await;
    create(addr, serde_json::json!({"name": "none", "type": "set"})).await;
    create(addr, serde_json::json!({"name": "periodic", "type": "set", "persistence": "periodic", "auto_save_ms": 1000})).await;
    create(
        addr,
        serde_json::json!({"name": "sync", "type": "set", "persistence": "sync"}),
    )
    .await;
    create(addr, serde_json::json!({"name": "counters", "type": "set"})).await;
    create(
        addr,
        serde_json::json!({"name": "ordered", "type": "ordered_set"}),
    )
    .await;
    create(addr, serde_json::json!({"name": "mixed", "type": "set"})).await;
    for t in ["hits", "none", "periodic", "sync", "ordered", "mixed"] {
        fill(addr, t, n).await;
    }

    let value = value100();
    let c = opts.connections;
    let d = opts.duration;
    let ok2xx: Accept = |s| (200..300).contains(&s);
    let hit_name = format!("GET hit (set, {n} keys)");
    let rows_spec: Vec<(&str, Workload, Accept)> = vec![
        (
            "noop",
            Arc::new(|_: &mut Rng| (Method::GET, "/noop".to_owned(), Bytes::new())),
            ok2xx,
        ),
        (
            hit_name.as_str(),
            Arc::new(move |r: &mut Rng| {
                (
                    Method::GET,
                    format!("/v1/tables/hits/entries/{}", key(r.below(n))),
                    Bytes::new(),
                )
            }),
            ok2xx,
        ),
        (
            "GET miss",
            Arc::new(move |r: &mut Rng| {
                (
                    Method::GET,
                    format!("/v1/tables/hits/entries/absent{}", r.below(n)),
                    Bytes::new(),
                )
            }),
            |s| s == 404,
        ),
        (
            "PUT replace, none",
            {
                let v = value.clone();
                Arc::new(move |r: &mut Rng| {
                    (
                        Method::PUT,
                        format!("/v1/tables/none/entries/{}", key(r.below(n))),
                        v.clone(),
                    )
                })
            },
            ok2xx,
        ),
        (
            "PUT replace, periodic 1000 ms",
            {
                let v = value.clone();
                Arc::new(move |r: &mut Rng| {
                    (
                        Method::PUT,
                        format!("/v1/tables/periodic/entries/{}", key(r.below(n))),
                        v.clone(),
                    )
                })
            },
            ok2xx,
        ),
        (
            "PUT replace, sync",
            {
                let v = value.clone();
                Arc::new(move |r: &mut Rng| {
                    (
                        Method::PUT,
                        format!("/v1/tables/sync/entries/{}", key(r.below(n))),
                        v.clone(),
                    )
                })
            },
            ok2xx,
        ),
        (
            "counter, one hot key",
            Arc::new(|_: &mut Rng| {
                (
                    Method::POST,
                    "/v1/tables/counters/entries/hot/counter".to_owned(),
                    Bytes::from_static(b"{\"default\":0}"),
                )
            }),
            ok2xx,
        ),
        (
            "counter, 10k keys",
            Arc::new(|r: &mut Rng| {
                (
                    Method::POST,
                    format!("/v1/tables/counters/entries/c{}/counter", r.below(10_000)),
                    Bytes::from_static(b"{\"default\":0}"),
                )
            }),
            ok2xx,
        ),
        (
            "scan 100, ordered_set",
            Arc::new(move |r: &mut Rng| {
                (
                    Method::GET,
                    format!(
                        "/v1/tables/ordered/entries?start={}&limit=100",
                        key(r.below(n.saturating_sub(100).max(1)))
                    ),
                    Bytes::new(),
                )
            }),
            ok2xx,
        ),
        (
            "mixed 90% GET / 10% PUT, Zipf",
            {
                let zipf = Arc::new(Zipf::new(n));
                let v = value.clone();
                Arc::new(move |r: &mut Rng| {
                    let k = key(zipf.sample(r));
                    if r.below(10) == 0 {
                        (
                            Method::PUT,
                            format!("/v1/tables/mixed/entries/{k}"),
                            v.clone(),
                        )
                    } else {
                        (
                            Method::GET,
                            format!("/v1/tables/mixed/entries/{k}"),
                            Bytes::new(),
                        )
                    }
                })
            },
            ok2xx,
        ),
    ];

    eprintln!("warming up for {:?}…", opts.warmup);
    let (_, warm, okw) = &rows_spec[1];
    run_row(addr, c, opts.warmup, "warmup", warm.clone(), *okw).await;

    let mut rows = Vec::new();
    for (name, work, ok) in &rows_spec {
        eprintln!("running {name}…");
        let before = (
            metric(addr, "larder_sync_writes_total").await,
            metric(addr, "larder_writeback_rounds_total").await,
        );
        let mut row = run_row(addr, c, d, name, work.clone(), *ok).await;
        if name.contains("sync") {
            let after = (
                metric(addr, "larder_sync_writes_total").await,
                metric(addr, "larder_writeback_rounds_total").await,
            );
            let rounds = after.1 - before.1;
            row.writes_per_fsync = Some(if rounds > 0.0 {
                (after.0 - before.0) / rounds
            } else {
                0.0
            });
        }
        rows.push(row);
    }
    let noop = rows[0].rps.max(1.0);
    for r in &mut rows {
        r.ratio = r.rps / noop;
    }

    // Memory: resident growth of the server per entry.
    eprintln!("measuring memory with {} entries…", opts.memory_entries);
    create(addr, serde_json::json!({"name": "memory", "type": "set"})).await;
    let before = server.resident_bytes();
    fill(addr, "memory", opts.memory_entries).await;
    let per_entry =
        server.resident_bytes().saturating_sub(before) as f64 / opts.memory_entries.max(1) as f64;
    drop(server);

    // Start-up: load N persisted entries.
    eprintln!(
        "measuring start-up with {} persisted entries…",
        opts.startup_entries
    );
    let sdir = tempfile::tempdir().unwrap_or_else(|e| fail(&format!("temp dir: {e}")));
    let mut s = Server::start(&bin, &sdir.path().join("data"));
    wait_ready(s.addr).await;
    create(
        s.addr,
        serde_json::json!({"name": "durable", "type": "set", "persistence": "periodic"}),
    )
    .await;
    fill(s.addr, "durable", opts.startup_entries).await;
    post_json(s.addr, "/v1/tables/durable/sync", String::new()).await;
    s.terminate();
    let started = Instant::now();
    let s = Server::start(&bin, &sdir.path().join("data"));
    wait_ready(s.addr).await;
    let startup_ms = started.elapsed().as_millis() as u64;
    let loaded = s
        .logs
        .lock()
        .map(|l| l.iter().any(|line| line.contains("recovery complete")))
        .unwrap_or(false);
    if !loaded {
        fail("the restarted server did not report recovery");
    }
    drop(s);

    let ratio = |prefix: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(prefix))
            .map_or(0.0, |r| r.ratio)
    };
    let sync = rows.iter().find(|r| r.name.contains("sync"));
    let raw = 16.0 + 100.0;
    let targets = vec![
        (
            "GET hit >= 0.85 of noop".to_owned(),
            ratio("GET hit") >= 0.85,
        ),
        (
            "PUT none >= 0.80".to_owned(),
            ratio("PUT replace, none") >= 0.80,
        ),
        (
            "PUT periodic >= 0.75".to_owned(),
            ratio("PUT replace, periodic") >= 0.75,
        ),
        (
            "counter 10k keys >= 0.80".to_owned(),
            ratio("counter, 10k") >= 0.80,
        ),
        (
            "counter hot key >= 0.60".to_owned(),
            ratio("counter, one hot") >= 0.60,
        ),
        (
            "sync PUT >= 0.30".to_owned(),
            ratio("PUT replace, sync") >= 0.30,
        ),
        (
            "sync >= 20 writes per fsync".to_owned(),
            sync.and_then(|r| r.writes_per_fsync).unwrap_or(0.0) >= 20.0,
        ),
        ("memory <= 2.5x raw".to_owned(), per_entry <= 2.5 * raw),
        ("start-up of 1M entries < 5 s".to_owned(), startup_ms < 5000),
    ];
    let report = Report {
        machine: machine(),
        connections: c,
        duration_s: d.as_secs_f64(),
        rows,
        memory_entries: opts.memory_entries,
        resident_bytes_per_entry: per_entry,
        raw_bytes_per_entry: raw,
        startup_entries: opts.startup_entries,
        startup_ms,
        targets,
    };
    print_report(&report);
    match serde_json::to_vec_pretty(&report) {
        Ok(json) => {
            if let Err(e) = std::fs::write(&opts.out, json) {
                fail(&format!("cannot write {}: {e}", opts.out.display()));
            }
            println!("\nresults written to {}", opts.out.display());
        }
        Err(e) => fail(&format!("cannot encode results: {e}")),
    }
}

fn print_report(r: &Report) {
    println!("machine: {}", r.machine);
    println!(
        "{} keep-alive connections, {:.1} s per row\n",
        r.connections, r.duration_s
    );
    println!("| operation | req/s | p50 µs | p99 µs | p99.9 µs | vs noop |");
    println!("|---|---:|---:|---:|---:|---:|");
    for row in &r.rows {
        let extra = row
            .writes_per_fsync
            .map(|w| format!(" ({w:.1} writes/fsync)"))
            .unwrap_or_default();
        println!(
            "| {}{} | {:.0} | {} | {} | {} | {:.2} |",
            row.name, extra, row.rps, row.p50_us, row.p99_us, row.p999_us, row.ratio
        );
        if row.errors > 0 {
            println!("|   ({} failed requests) | | | | | |", row.errors);
        }
    }
    println!(
        "\nmemory: {:.0} resident bytes per entry for {} entries of 16-byte keys and 100-byte values ({:.2}x the {:.0} raw bytes)",
        r.resident_bytes_per_entry,
        r.memory_entries,
        r.resident_bytes_per_entry / r.raw_bytes_per_entry,
        r.raw_bytes_per_entry
    );
    println!(
        "start-up: {} persisted entries loaded and ready in {} ms",
        r.startup_entries, r.startup_ms
    );
    println!("\ntargets:");
    for (t, met) in &r.targets {
        println!("  {} {t}", if *met { "met    " } else { "NOT MET" });
    }
}

fn main() {
    let opts = Options::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    runtime.block_on(run(opts));
}
