//! Redis as the peer of the memory and start-up rows: how many resident
//! bytes redis-server grows by for the same entries (SETs of the same keys
//! and values), and how long it takes to load them back from an RDB file
//! after a kill.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::procs::{self, fail, Proc};

/// What Redis measured.
#[derive(Debug, Clone, Copy)]
pub struct RedisPeer {
    /// Resident growth per entry after the SETs, bytes.
    pub bytes_per_entry: f64,
    /// From the start of redis-server on the saved RDB until it answers
    /// `PING` (it answers `-LOADING` until the file is loaded).
    pub rdb_load_ms: u64,
}

/// Loads `entries` keys (`key(i)`) with `value` into a fresh redis-server
/// and measures it; `None` when redis-server is not installed.
pub fn measure(
    dir: &Path,
    entries: usize,
    key: impl Fn(usize) -> String,
    value: &str,
) -> Option<RedisPeer> {
    if !crate::procs::on_path("redis-server") {
        return None;
    }
    let data = dir.join("redis-memory");
    std::fs::create_dir_all(&data).unwrap_or_else(|e| fail(&format!("redis dir: {e}")));
    eprintln!("memory: {entries} entries in Redis…");
    let redis = start(&data);
    let empty = redis.settled_rss();
    let mut conn = connect(redis.addr);
    // Pipelined in batches: one write, then every reply read back.
    const BATCH: usize = 10_000;
    for start in (0..entries).step_by(BATCH) {
        let end = (start + BATCH).min(entries);
        let mut out = Vec::with_capacity((end - start) * (value.len() + 48));
        for i in start..end {
            let k = key(i);
            out.extend_from_slice(
                format!(
                    "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n",
                    k.len(),
                    value.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        conn.get_mut()
            .write_all(&out)
            .unwrap_or_else(|e| fail(&format!("redis SET: {e}")));
        for _ in start..end {
            expect(&mut conn, "+OK");
        }
    }
    let loaded = redis.settled_rss();
    let bytes_per_entry = loaded.saturating_sub(empty) as f64 / entries as f64;
    conn.get_mut()
        .write_all(b"*1\r\n$4\r\nSAVE\r\n")
        .unwrap_or_else(|e| fail(&format!("redis SAVE: {e}")));
    expect(&mut conn, "+OK");
    drop(conn);
    // SIGKILL, as for larder: the RDB is what survives.
    drop(redis);
    let started = Instant::now();
    let again = start(&data);
    let deadline = started + Duration::from_secs(120);
    loop {
        let mut c = connect(again.addr);
        c.get_mut()
            .write_all(b"*1\r\n$4\r\nPING\r\n")
            .unwrap_or_else(|e| fail(&format!("redis PING: {e}")));
        if line(&mut c) == "+PONG" {
            break;
        }
        if Instant::now() > deadline {
            fail("redis-server did not load its RDB within 120 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let rdb_load_ms = started.elapsed().as_millis() as u64;
    Some(RedisPeer {
        bytes_per_entry,
        rdb_load_ms,
    })
}

/// redis-server on a free port, saving only when told, into `data`.
fn start(data: &Path) -> Proc {
    let port = procs::free_port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--save",
            "",
            "--appendonly",
            "no",
            "--dbfilename",
            "dump.rdb",
        ])
        .arg("--dir")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start redis-server: {e}")));
    let proc = Proc {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(proc.addr).is_err() {
        if Instant::now() > deadline {
            fail("redis-server did not listen");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    proc
}

fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    let stream = TcpStream::connect(addr).unwrap_or_else(|e| fail(&format!("redis: {e}")));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    BufReader::new(stream)
}

/// One reply line, without its CRLF.
fn line(conn: &mut BufReader<TcpStream>) -> String {
    let mut s = String::new();
    conn.read_line(&mut s)
        .unwrap_or_else(|e| fail(&format!("redis reply: {e}")));
    s.trim_end().to_owned()
}

fn expect(conn: &mut BufReader<TcpStream>, want: &str) {
    let got = line(conn);
    if got != want {
        fail(&format!("redis answered {got:?}, not {want:?}"));
    }
}
