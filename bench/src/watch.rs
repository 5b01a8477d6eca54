//! Change-stream rows:
//!
//! - PUT throughput on a table with 1 watcher of every change, with 100
//!   watchers of 1% of the keys each, and with 100 watchers of every
//!   change, each against the same PUTs on a table nobody watches (target:
//!   100 watchers cost at most 20%). The last row asks the one reader
//!   thread here to take 100 times the write stream, which it cannot on a
//!   small machine: its figure shows that writers keep their speed when
//!   watchers fall behind, not what 100 fast watchers would cost;
//! - the resident memory of 1,000 idle watchers.
//!
//! The watchers are raw HTTP/1.1 connections read by one thread, so they
//! take as little of the machine from the server as a reader can.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pair::PairRow;
use crate::procs::{fail, metric, Proc};
use crate::wrk::{self, Workload};
use crate::{create, value100, Options};

/// Everything the watch rows measured.
#[derive(Debug, Serialize)]
pub struct WatchReport {
    pub rows: Vec<PairRow>,
    /// Megabytes of events the 100 watchers received per second, summed,
    /// while wrk ran.
    pub mb_per_sec_100: f64,
    /// Watch streams that ended (lagged or closed) while they were read.
    pub ended_streams: u64,
    /// Idle watchers opened for the memory figure.
    pub idle_watchers: usize,
    /// Growth of the server's resident memory with them open, bytes.
    pub idle_rss_growth_bytes: i64,
}

/// A set of watch connections read (and discarded) by one thread.
struct Watchers {
    /// Bytes of events received.
    bytes: Arc<AtomicU64>,
    ended: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Watchers {
    /// Opens one watch of `table` per query in `queries` and returns once
    /// every one has its response headers.
    fn open(addr: SocketAddr, table: &str, queries: Vec<String>) -> Watchers {
        let n = queries.len();
        let bytes = Arc::new(AtomicU64::new(0));
        let ended = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let requests: Vec<String> = queries
            .iter()
            .map(|q| {
                format!(
                    "GET /v1/tables/{table}/watch{q} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
                )
            })
            .collect();
        let thread = {
            let (bytes, ended, stop) = (bytes.clone(), ended.clone(), stop.clone());
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap_or_else(|e| fail(&format!("watcher runtime: {e}")));
                rt.block_on(async move {
                    let mut tasks = Vec::with_capacity(n);
                    for request in requests {
                        let (bytes, ended, stop) = (bytes.clone(), ended.clone(), stop.clone());
                        let ready = ready_tx.clone();
                        tasks.push(tokio::spawn(async move {
                            read_one(addr, &request, &bytes, &stop, ready).await;
                            ended.fetch_add(1, Ordering::Relaxed);
                        }));
                    }
                    drop(ready_tx);
                    for t in tasks {
                        let _ = t.await;
                    }
                });
            })
        };
        for _ in 0..n {
            match ready_rx.recv_timeout(Duration::from_secs(30)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => fail(&format!("a watcher failed to start: {e}")),
                Err(e) => fail(&format!("watchers did not start: {e}")),
            }
        }
        // `ended` counts streams that end while being read: not the stop.
        Watchers {
            bytes,
            ended,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One watch connection: sends the request, reports once the headers came,
/// then counts the bytes of the stream until told to stop or it ends.
async fn read_one(
    addr: SocketAddr,
    request: &str,
    bytes: &AtomicU64,
    stop: &AtomicBool,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let mut stream = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    if let Err(e) = stream.write_all(request.as_bytes()).await {
        let _ = ready.send(Err(e.to_string()));
        return;
    }
    let mut buf = vec![0u8; 64 * 1024];
    let mut head = Vec::new();
    let mut reported = false;
    while !stop.load(Ordering::Relaxed) {
        let read = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
        let n = match read {
            Err(_) => continue,
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
        };
        let mut data = &buf[..n];
        if !reported {
            head.extend_from_slice(data);
            let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            if !head.starts_with(b"HTTP/1.1 200") {
                let _ = ready.send(Err(String::from_utf8_lossy(&head).into_owned()));
                return;
            }
            let _ = ready.send(Ok(()));
            reported = true;
            data = &data[data.len().saturating_sub(head.len() - end - 4)..];
        }
        // Bytes only: scanning them for events would take the CPU the
        // server needs on a small machine.
        bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
    }
}

/// Runs the rows against `larder` (a server of its own).
pub fn run(opts: &Options, larder: &Proc, scripts: &std::path::Path) -> WatchReport {
    let addr = larder.addr;
    let (c, d) = (opts.connections, opts.duration);
    let body = value100();
    for name in ["plain", "one", "split", "hundred", "idle"] {
        create(addr, serde_json::json!({"name": name, "type": "set"}));
    }
    let put = |table: &str| {
        Workload::new(
            "PUT",
            &format!("/v1/tables/{table}/entries/%K"),
            Some(&body),
            opts.keys,
        )
        .save(scripts, &format!("watch-put-{table}"))
    };
    let plain = put("plain");
    let every = |n: usize| vec![String::new(); n];
    // Keys are `k` and 15 digits: the two before the last two split them
    // into 100 prefixes of 1% each (of up to 10,000 keys).
    let split: Vec<String> = (0..100)
        .map(|p| format!("?prefix={}", &crate::key(p * 100)[..14]))
        .collect();
    let mut rows = Vec::new();
    let mut ended = 0;
    let mut mb_per_sec_100 = 0.0;
    let cases = [
        ("PUT with 1 watcher", "one", every(1)),
        ("PUT with 100 watchers, 1% of keys each", "split", split),
        (
            "PUT with 100 watchers of every change",
            "hundred",
            every(100),
        ),
    ];
    for (name, table, queries) in cases {
        let watched = put(table);
        let all = table == "hundred";
        let watchers = Watchers::open(addr, table, queries);
        let mut row = PairRow::new(name, "PUT, no watcher", 0.80);
        let mut delivered = 0u64;
        let mut watched_secs = 0.0;
        row.alternate(
            opts.rounds,
            || wrk::run(addr, Some(&plain), "/", c, d).rps,
            || {
                let before = watchers.bytes.load(Ordering::Relaxed);
                let started = Instant::now();
                let run = wrk::run(addr, Some(&watched), "/", c, d);
                watched_secs += started.elapsed().as_secs_f64();
                delivered += watchers.bytes.load(Ordering::Relaxed) - before;
                (run, 1.0)
            },
        );
        rows.push(row);
        if all {
            mb_per_sec_100 = delivered as f64 / 1e6 / watched_secs.max(1e-9);
        }
        ended += watchers.ended.load(Ordering::Relaxed);
    }

    let idle = 1000;
    let before = larder.rss() as i64;
    let watchers = Watchers::open(addr, "idle", vec![String::new(); idle]);
    let open = metric(addr, "larder_table_watchers{table=\"idle\"}");
    if open as usize != idle {
        fail(&format!("{open} idle watchers registered of {idle}"));
    }
    let after = larder.rss() as i64;
    drop(watchers);
    WatchReport {
        rows,
        mb_per_sec_100,
        ended_streams: ended,
        idle_watchers: idle,
        idle_rss_growth_bytes: after - before,
    }
}
