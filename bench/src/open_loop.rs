//! An open-loop load generator for the latency rows: requests go out at a
//! fixed rate on a schedule that does not wait for answers, and each
//! latency is measured from the request's intended send time, not from
//! when it was actually sent. A closed-loop generator (wrk) stops sending
//! while the server stalls and so hides the stall from its percentiles
//! (coordinated omission); wrk2 and oha's `-q` correct it the same way.
//!
//! Percentiles are exact: every latency is kept (a few hundred thousand
//! per run) and sorted, rather than binned as an HDR histogram does.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
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

/// How long requests still unanswered at the end of a run are waited for
/// before they count as errors.
const DRAIN: Duration = Duration::from_secs(10);

/// One keep-alive connection and its place in the schedule.
struct Conn {
    stream: Option<TcpStream>,
    /// Intended send time of its next request, ns from the start.
    next_ns: u64,
    /// Intended send time of the request in flight, if one is.
    in_flight: Option<u64>,
    /// Bytes of the request not yet written.
    out: Vec<u8>,
    /// Bytes of the answer read so far.
    read: Vec<u8>,
    rng: u64,
}

/// Sends `requests` (raw HTTP/1.1 requests, picked at random) to `addr` at
/// `rate` per second in total over `connections` keep-alive connections,
/// for `duration`.
///
/// One thread drives every connection from one `ppoll` loop, sleeping
/// until the next send is due or an answer arrives: a thread per
/// connection competed with the server for the two cores (even the floor
/// showed a 3 ms p99 at half its rate). A connection whose answer is late
/// sends its next request as soon as the answer is in, and that request's
/// latency still counts from its own intended time.
pub fn run(
    addr: SocketAddr,
    requests: &Arc<Vec<Vec<u8>>>,
    rate: f64,
    connections: usize,
    duration: Duration,
) -> Tail {
    let n = connections.max(1);
    // Each connection sends every `interval`, offset from the others so
    // the sends are spread evenly.
    let interval_ns = ((n as f64 / rate.max(1.0)) * 1e9).max(1.0) as u64;
    let end_ns = duration.as_nanos() as u64;
    let mut conns: Vec<Conn> = (0..n)
        .map(|c| Conn {
            stream: connect(addr),
            next_ns: interval_ns * c as u64 / n as u64,
            in_flight: None,
            out: Vec::new(),
            read: Vec::with_capacity(4096),
            rng: 0x9E37_79B9_7F4A_7C15u64 ^ (c as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03),
        })
        .collect();
    let mut latencies: Vec<u64> = Vec::with_capacity((end_ns / interval_ns) as usize * n + n);
    let mut errors = 0u64;
    let start = Instant::now() + Duration::from_millis(50);
    let ns_since =
        |start: Instant| Instant::now().saturating_duration_since(start).as_nanos() as u64;
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(n);
    loop {
        let now = ns_since(start);
        // Send what is due on every idle connection.
        for c in &mut conns {
            if c.in_flight.is_none() && c.next_ns <= now && c.next_ns < end_ns {
                let req = &requests[(xorshift(&mut c.rng) % requests.len() as u64) as usize];
                c.out.clear();
                c.out.extend_from_slice(req);
                c.read.clear();
                c.in_flight = Some(c.next_ns);
                c.next_ns += interval_ns;
                if !flush(c) {
                    errors += 1;
                    reset(c, addr);
                }
            }
        }
        // Done once every request of the schedule was sent and answered
        // (or the drain ran out).
        if now >= end_ns
            && conns
                .iter()
                .all(|c| c.in_flight.is_none() && c.next_ns >= end_ns)
        {
            break;
        }
        if now >= end_ns + DRAIN.as_nanos() as u64 {
            errors += conns.iter().filter(|c| c.in_flight.is_some()).count() as u64;
            break;
        }
        // Sleep until an answer comes or the next send is due.
        let wake_ns = conns
            .iter()
            .filter(|c| c.in_flight.is_none() && c.next_ns < end_ns)
            .map(|c| c.next_ns)
            .min()
            .unwrap_or(end_ns + DRAIN.as_nanos() as u64);
        let wait = wake_ns.saturating_sub(ns_since(start)).min(100_000_000);
        fds.clear();
        fds.extend(conns.iter().map(|c| libc::pollfd {
            fd: c.stream.as_ref().map_or(-1, AsRawFd::as_raw_fd),
            events: if c.out.is_empty() {
                libc::POLLIN
            } else {
                libc::POLLIN | libc::POLLOUT
            },
            revents: 0,
        }));
        let timeout = libc::timespec {
            tv_sec: (wait / 1_000_000_000) as libc::time_t,
            tv_nsec: (wait % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: `fds` is a live, initialized array of `fds.len()` pollfd
        // structs; `timeout` outlives the call; no signal mask is passed.
        let ready = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &timeout,
                std::ptr::null(),
            )
        };
        if ready <= 0 {
            continue;
        }
        for (c, fd) in conns.iter_mut().zip(&fds) {
            if fd.revents == 0 {
                continue;
            }
            if fd.revents & libc::POLLOUT != 0 && !flush(c) {
                errors += 1;
                reset(c, addr);
                continue;
            }
            match receive(c) {
                Ok(false) => {}
                Ok(true) => {
                    if let Some(intended) = c.in_flight.take() {
                        latencies.push(ns_since(start).saturating_sub(intended));
                    }
                }
                Err(()) => {
                    errors += 1;
                    reset(c, addr);
                }
            }
        }
    }
    latencies.sort_unstable();
    let pct = |q: f64| {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((q * latencies.len() as f64).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[i] as f64 / 1e3
    };
    Tail {
        rate,
        achieved: latencies.len() as f64 / duration.as_secs_f64(),
        samples: latencies.len(),
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

fn connect(addr: SocketAddr) -> Option<TcpStream> {
    let stream = TcpStream::connect(addr).ok()?;
    let _ = stream.set_nodelay(true);
    stream.set_nonblocking(true).ok()?;
    Some(stream)
}

/// After a failed exchange: a new connection, nothing in flight.
fn reset(c: &mut Conn, addr: SocketAddr) {
    c.stream = connect(addr);
    c.in_flight = None;
    c.out.clear();
    c.read.clear();
}

/// Writes what the connection can take of its pending request. False when
/// the connection failed.
fn flush(c: &mut Conn) -> bool {
    let Some(stream) = c.stream.as_mut() else {
        return false;
    };
    while !c.out.is_empty() {
        match stream.write(&c.out) {
            Ok(0) => return false,
            Ok(k) => {
                c.out.drain(..k);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(_) => return false,
        }
    }
    true
}

/// Reads what has arrived; true once a whole answer (a `Content-Length`
/// body) is in, which is then dropped from the buffer.
fn receive(c: &mut Conn) -> Result<bool, ()> {
    let stream = c.stream.as_mut().ok_or(())?;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(()),
            Ok(k) => c.read.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(_) => return Err(()),
        }
    }
    match answer_length(&c.read)? {
        Some(len) if c.read.len() >= len => {
            if c.in_flight.is_none() {
                // An answer nobody asked for.
                return Err(());
            }
            c.read.drain(..len);
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The whole length of the answer at the start of `buf` (head and body),
/// once its head is in; an error if it is not an HTTP/1.1 answer.
fn answer_length(buf: &[u8]) -> Result<Option<usize>, ()> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| ())?;
    if !head.starts_with("HTTP/1.1 ") {
        return Err(());
    }
    let mut length = 0usize;
    for line in head.split("\r\n").skip(1) {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| ())?;
            }
        }
    }
    Ok(Some(head_end + 4 + length))
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

    #[test]
    fn an_answer_is_whole_once_its_body_is_in() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(answer_length(&head[..10]), Ok(None));
        assert_eq!(answer_length(head), Ok(Some(head.len() + 3)));
        assert_eq!(answer_length(b"SSH-2.0\r\n\r\n"), Err(()));
    }
}
