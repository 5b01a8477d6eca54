//! An open-loop load generator for the latency rows: requests go out at a
//! fixed rate on a schedule that does not wait for answers, and each
//! latency is measured from the request's intended send time, not from
//! when it was actually sent. A closed-loop generator (wrk) stops sending
//! while the server stalls and so hides the stall from its percentiles
//! (coordinated omission); wrk2 and oha's `-q` correct it the same way.
//!
//! Percentiles are exact: every latency is kept (a few hundred thousand
//! per run) and sorted, rather than binned as an HDR histogram does.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// What one open-loop run measured.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Tail {
    /// The rate asked for, requests per second.
    pub rate: f64,
    /// Answers per second received.
    pub achieved: f64,
    /// Answers received.
    pub samples: usize,
    /// Requests that failed (connection closed or malformed answer).
    pub errors: u64,
    /// Latency percentiles from the intended send time, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

/// Sends `requests` (raw HTTP/1.1 requests, picked at random) to `addr` at
/// `rate` per second in total over `connections` keep-alive connections,
/// for `duration`.
pub fn run(
    addr: SocketAddr,
    requests: &Arc<Vec<Vec<u8>>>,
    rate: f64,
    connections: usize,
    duration: Duration,
) -> Tail {
    let connections = connections.max(1);
    // Each connection sends every `interval`, offset from the others so
    // the sends are spread evenly.
    let interval_ns = (connections as f64 / rate.max(1.0) * 1e9) as u64;
    let start = Instant::now() + Duration::from_millis(50);
    let end_ns = duration.as_nanos() as u64;
    let threads: Vec<_> = (0..connections)
        .map(|c| {
            let requests = requests.clone();
            std::thread::spawn(move || {
                let offset_ns = interval_ns * c as u64 / connections as u64;
                let mut rng =
                    0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
                let mut latencies = Vec::with_capacity((end_ns / interval_ns.max(1)) as usize + 1);
                let mut errors = 0u64;
                let mut conn = connect(addr);
                for i in 0u64.. {
                    let at_ns = offset_ns + i * interval_ns;
                    if at_ns >= end_ns {
                        break;
                    }
                    let intended = start + Duration::from_nanos(at_ns);
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    let req = &requests[(xorshift(&mut rng) % requests.len() as u64) as usize];
                    let answered = conn
                        .as_mut()
                        .ok_or(())
                        .and_then(|c| exchange(c, req).map_err(|_| ()));
                    match answered {
                        Ok(()) => latencies.push(intended.elapsed().as_nanos() as u64),
                        Err(()) => {
                            errors += 1;
                            conn = connect(addr);
                        }
                    }
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in threads {
        let (l, e) = t.join().unwrap_or_default();
        all.extend(l);
        errors += e;
    }
    all.sort_unstable();
    let pct = |q: f64| {
        if all.is_empty() {
            return 0.0;
        }
        let i = ((q * all.len() as f64).ceil() as usize).clamp(1, all.len()) - 1;
        all[i] as f64 / 1e3
    };
    Tail {
        rate,
        achieved: all.len() as f64 / duration.as_secs_f64(),
        samples: all.len(),
        errors,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        p999_us: pct(0.999),
    }
}

/// The next number of a xorshift generator: cheap, and the same sequence
/// on every run.
fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn connect(addr: SocketAddr) -> Option<BufReader<TcpStream>> {
    let stream = TcpStream::connect(addr).ok()?;
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    Some(BufReader::new(stream))
}

/// Sends one request and reads its whole answer (a `Content-Length` body).
fn exchange(conn: &mut BufReader<TcpStream>, req: &[u8]) -> std::io::Result<()> {
    conn.get_mut().write_all(req)?;
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let mut line = String::new();
    let mut length = 0usize;
    let mut first = true;
    loop {
        line.clear();
        if conn.read_line(&mut line)? == 0 {
            return Err(bad("closed"));
        }
        let l = line.trim_end();
        if first {
            if !l.starts_with("HTTP/1.1 ") {
                return Err(bad("not an HTTP/1.1 answer"));
            }
            first = false;
            continue;
        }
        if l.is_empty() {
            break;
        }
        if let Some((name, value)) = l.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| bad("content-length"))?;
            }
        }
    }
    let mut body = vec![0u8; length];
    conn.read_exact(&mut body)
}

/// Raw HTTP/1.1 requests: `method` on `path` with `%K` a random key of
/// `keys` (`key(i)`), and `body` if any; `count` of them.
pub fn requests(
    method: &str,
    path: &str,
    body: Option<&str>,
    keys: usize,
    count: usize,
    key: impl Fn(usize) -> String,
) -> Vec<Vec<u8>> {
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    (0..count)
        .map(|_| {
            let p = path.replace(
                "%K",
                &key((xorshift(&mut rng) % keys.max(1) as u64) as usize),
            );
            let mut r = format!("{method} {p} HTTP/1.1\r\nHost: bench\r\n");
            if let Some(b) = body {
                r.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
                    b.len()
                ));
            } else {
                r.push_str("\r\n");
            }
            r.into_bytes()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_whole_http_requests() {
        let r = requests("PUT", "/t/%K", Some("{}"), 3, 4, |i| format!("k{i}"));
        assert_eq!(r.len(), 4);
        let text = String::from_utf8(r[0].clone()).unwrap();
        assert!(text.starts_with("PUT /t/k"), "{text}");
        assert!(text.ends_with("Content-Length: 2\r\n\r\n{}"), "{text}");
    }
}
