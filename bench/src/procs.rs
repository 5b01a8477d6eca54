//! The processes a benchmark run starts (larder, the ceiling, Redis and
//! Webdis), a blocking HTTP/1.1 client for setting them up, and resident
//! memory readings.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Stops the run with a message.
pub fn fail(msg: &str) -> ! {
    eprintln!("larder-bench: {msg}");
    std::process::exit(1);
}

/// A child process serving HTTP at `addr`; killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Resident memory of the process, bytes.
    pub fn rss(&self) -> u64 {
        rss_bytes(self.child.id())
    }

    /// Resident bytes once they stop changing: two readings 200 ms apart
    /// within 1 MiB of each other, or the last reading after 5 s. Work the
    /// server finishes just after answering (a write-back round giving
    /// freed memory back) is then counted, not caught half-way.
    pub fn settled_rss(&self) -> u64 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut last = self.rss();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let now = self.rss();
            if now.abs_diff(last) < 1 << 20 || std::time::Instant::now() >= deadline {
                return now;
            }
            last = now;
        }
    }
}

/// Starts `bin` with `args` and reads its address from the first stdout
/// line for which `addr_of` finds one.
fn start(mut cmd: Command, what: &str, addr_of: fn(&str) -> Option<SocketAddr>) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| fail(&format!("cannot start {what}: {e}")));
    let Some(stdout) = child.stdout.take() else {
        fail(&format!("no stdout from {what}"));
    };
    let (tx, rx) = mpsc::channel();
    // Drains stdout for the child's whole life, so logging never blocks it.
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = addr_of(&line) {
                let _ = tx.send(addr);
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| fail(&format!("{what} did not say where it listens")));
    Proc { child, addr }
}

/// Starts larder on `data` and waits until it is ready.
pub fn start_larder(bin: &Path, data: &Path, extra: &[&str]) -> Proc {
    start_larder_probed(bin, data, extra, None)
}

/// Like [`start_larder`], asking `/readyz` of `probe` (an admin listener,
/// for a server whose main listener speaks HTTPS) instead of the main
/// address.
pub fn start_larder_probed(
    bin: &Path,
    data: &Path,
    extra: &[&str],
    probe: Option<SocketAddr>,
) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
        "--log",
        "info",
    ])
    .arg("--data-dir")
    .arg(data)
    .args(["--max-concurrent-requests", "100000"])
    .args(extra)
    .env_clear()
    .envs(std::env::vars().filter(|(k, _)| !k.starts_with("LARDER_")));
    let proc = start(cmd, "larder", |line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v["fields"]["message"]
            .as_str()
            .or(v["message"].as_str())?
            .starts_with("larder listening")
        {
            v["fields"]["addr"]
                .as_str()
                .or(v["addr"].as_str())?
                .parse()
                .ok()
        } else {
            None
        }
    });
    wait_ready(probe.unwrap_or(proc.addr));
    proc
}

/// Starts the ceiling (a minimal hyper server).
pub fn start_ceiling(bin: &Path) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.arg("127.0.0.1:0");
    start(cmd, "larder-ceiling", |line| {
        line.strip_prefix("listening on ")?.parse().ok()
    })
}

/// A free loopback port (bound and released; the race is harmless here).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| fail(&format!("no free port: {e}")))
}

/// Whether `program` is on the PATH.
pub fn on_path(program: &str) -> bool {
    Command::new("which")
        .arg(program)
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes sure `program` is on the PATH, installing Debian's `package`
/// with apt-get when it is missing; false when that failed (no apt, no
/// network, not root).
pub fn ensure_program(program: &str, package: &str) -> bool {
    if on_path(program) {
        return true;
    }
    eprintln!("{program} is missing; installing {package} with apt-get…");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "-qq", package])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() {
        // A fresh machine may not have read the package lists yet.
        let _ = Command::new("apt-get")
            .args(["update", "-qq"])
            .stdout(Stdio::null())
            .status();
        install();
    }
    on_path(program)
}

/// Installs the peers (Redis, Webdis) when they are missing; says so
/// loudly when that fails, and the peer rows are left out.
pub fn ensure_peers() {
    for (program, package) in [("redis-server", "redis-server"), ("webdis", "webdis")] {
        if !ensure_program(program, package) {
            eprintln!("WARNING: {program} could not be installed (apt-get install {package}): its rows are left out");
        }
    }
}

/// Redis and Webdis in front of it, when both are installed.
pub struct Webdis {
    _redis: Proc,
    pub http: Proc,
}

/// Starts Redis and Webdis if both binaries are on the PATH.
pub fn start_webdis(dir: &Path) -> Option<Webdis> {
    if !on_path("redis-server") || !on_path("webdis") {
        return None;
    }
    let redis_port = free_port();
    let redis_child = Command::new("redis-server")
        .args([
            "--port",
            &redis_port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let redis = Proc {
        child: redis_child,
        addr: SocketAddr::from(([127, 0, 0, 1], redis_port)),
    };
    wait_tcp(redis.addr);
    let http_port = free_port();
    let conf = dir.join("webdis.json");
    let config = serde_json::json!({
        "redis_host": "127.0.0.1", "redis_port": redis_port,
        "http_host": "127.0.0.1", "http_port": http_port,
        "threads": 2, "pool_size": 64, "daemonize": false, "websockets": false,
        "database": 0, "verbosity": 0, "logfile": dir.join("webdis.log"),
    });
    std::fs::write(&conf, config.to_string()).ok()?;
    let webdis_child = Command::new("webdis")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let http = Proc {
        child: webdis_child,
        addr: SocketAddr::from(([127, 0, 0, 1], http_port)),
    };
    wait_tcp(http.addr);
    Some(Webdis {
        _redis: redis,
        http,
    })
}

fn wait_tcp(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            fail(&format!("nothing listens on {addr}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `/readyz` until it answers 200.
pub fn wait_ready(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if matches!(try_http(addr, "GET", "/readyz", "", b""), Ok((200, _))) {
            return;
        }
        if Instant::now() > deadline {
            fail(&format!("larder at {addr} never became ready"));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// One request on a fresh connection: status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    http_with(addr, method, path, "", body)
}

/// [`http`] with extra header lines (each ending in `\r\n`).
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> (u16, Vec<u8>) {
    try_http(addr, method, path, headers, body)
        .unwrap_or_else(|e| fail(&format!("{method} {path} on {addr}: {e}")))
}

fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: bench\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let status = std::str::from_utf8(&raw[..split])
        .ok()
        .and_then(|h| h.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status"))?;
    Ok((status, raw[split + 4..].to_vec()))
}

/// One sample of an unlabelled metric from larder's `/metrics`.
pub fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (_, body) = http(addr, "GET", "/metrics", b"");
    String::from_utf8_lossy(&body)
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// Resident memory of a process, bytes (0 if it cannot be read).
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A binary built next to this one, built first (release) if missing.
pub fn sibling(name: &str, given: Option<&PathBuf>) -> PathBuf {
    if let Some(p) = given {
        return p.clone();
    }
    let path = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name));
    if !path.exists() {
        eprintln!("building {name} first…");
        let built = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bin", name])
            .status();
        if !built.is_ok_and(|s| s.success()) {
            fail(&format!("cargo build --release --bin {name} failed"));
        }
    }
    path
}
