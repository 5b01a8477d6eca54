//! Connection bounds, driven over real sockets: request heads that never
//! complete are closed after the header timeout, idle keep-alive
//! connections after the idle timeout, the connection cap makes room by
//! closing the connection that waited longest for its head, heads over
//! 64 KiB get 431, and a server limited to 1,024 descriptors keeps serving a
//! well-behaved client while 1,100 sockets trickle request heads at it.

mod common;

use std::time::{Duration, Instant};

use common::child::ChildServer;
use common::spawn_with;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A request head without its final blank line: the server keeps waiting.
const PARTIAL_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: larder\r\n";
const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: larder\r\n\r\n";

/// Reads until the peer closes; `Ok(true)` when it closed (EOF or reset)
/// before `within`, `Ok(false)` when it was still open then.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// Sends `request` and reads one response head, returning its status.
async fn status_of(stream: &mut TcpStream, request: &[u8]) -> std::io::Result<u16> {
    stream.write_all(request).await?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad response {text:?}")))
}

#[tokio::test]
async fn a_head_that_never_completes_is_closed_after_the_header_timeout() {
    let app = spawn_with(|c| {
        c.header_timeout_ms = 300;
        c.idle_timeout_ms = 60_000;
    })
    .await;
    let mut silent = TcpStream::connect(app.addr).await.unwrap();
    let mut trickler = TcpStream::connect(app.addr).await.unwrap();
    trickler.write_all(PARTIAL_HEAD).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(10)).await);
    assert!(closed_within(&mut trickler, Duration::from_secs(10)).await);
    let closed = app
        .metric("larder_connections_closed_total{reason=\"header_timeout\"}")
        .await;
    assert!(closed >= 2.0, "{closed}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_outlives_the_header_timeout_then_closes() {
    let app = spawn_with(|c| {
        c.header_timeout_ms = 200;
        c.idle_timeout_ms = 2_000;
    })
    .await;
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    assert_eq!(status_of(&mut conn, HEALTHZ).await.unwrap(), 200);
    let idle_since = Instant::now();
    // Idle for three header timeouts: still open, since it is not waiting
    // for a head but between requests.
    assert!(!closed_within(&mut conn, Duration::from_millis(600)).await);
    assert_eq!(status_of(&mut conn, HEALTHZ).await.unwrap(), 200);
    assert!(closed_within(&mut conn, Duration::from_secs(10)).await);
    assert!(
        idle_since.elapsed() >= Duration::from_millis(2_000),
        "closed before the idle timeout"
    );
    let idle = app
        .metric("larder_connections_closed_total{reason=\"idle_timeout\"}")
        .await;
    assert!(idle >= 1.0, "{idle}");
}

#[tokio::test]
async fn at_the_cap_the_connection_waiting_longest_for_its_head_makes_room() {
    // Five: the four below and the test client's own keep-alive
    // connection from the readiness check, idle in its pool (an idle
    // connection goes only when no connection is waiting for its head).
    let app = spawn_with(|c| c.max_connections = 5).await;
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(app.addr).await.unwrap();
        s.write_all(PARTIAL_HEAD).await.unwrap();
        waiting.push(s);
        // Each must be registered before the next, so "longest" is known.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fresh = TcpStream::connect(app.addr).await.unwrap();
    assert_eq!(status_of(&mut fresh, HEALTHZ).await.unwrap(), 200);
    assert!(
        closed_within(&mut waiting[0], Duration::from_secs(10)).await,
        "the oldest waiting connection made room"
    );
    for s in &mut waiting[1..] {
        assert!(!closed_within(s, Duration::from_millis(50)).await);
    }
    // (This request's connection makes room too.)
    assert_eq!(app.metric("larder_connections_max").await, 5.0);
    let evicted = app
        .metric("larder_connections_closed_total{reason=\"evicted\"}")
        .await;
    assert!(evicted >= 1.0, "{evicted}");
}

#[tokio::test]
async fn a_request_head_over_64_kib_is_431() {
    let app = spawn_with(|_| {}).await;
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: larder\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    // The server may answer (and close) before it has read all of it.
    let _ = conn.write_all(big.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 431"), "{text}");
    // A head just under the limit is served.
    let mut conn = TcpStream::connect(app.addr).await.unwrap();
    let fits = format!(
        "GET /healthz HTTP/1.1\r\nHost: larder\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(60 * 1024)
    );
    assert_eq!(status_of(&mut conn, fits.as_bytes()).await.unwrap(), 200);
}

/// The server raises its soft open-file limit to the hard one; run it with
/// a hard limit of 1,024, and open more sockets than that, each sending
/// part of a request head. A well-behaved client is still served within
/// the header timeout plus a second, and every trickling socket is closed.
#[tokio::test]
async fn a_descriptor_limited_server_serves_a_good_client_beside_1100_tricklers() {
    larder::net::raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let header_timeout = Duration::from_millis(2_000);
    let server = ChildServer::start_under(
        dir.path(),
        &[("LARDER_HEADER_TIMEOUT_MS", "2000")],
        &["prlimit", "--nofile=1024:1024", "--"],
    )
    .await;
    let addr: std::net::SocketAddr = server.base.trim_start_matches("http://").parse().unwrap();
    let mut tricklers = Vec::new();
    for _ in 0..1_100 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        // The server may have closed it already to make room.
        let _ = s.write_all(&PARTIAL_HEAD[..10]).await;
        tricklers.push(s);
    }
    for s in &mut tricklers {
        let _ = s.write_all(&PARTIAL_HEAD[10..20]).await;
    }
    let started = Instant::now();
    let served = tokio::time::timeout(header_timeout + Duration::from_secs(1), async {
        let mut good = TcpStream::connect(addr).await?;
        status_of(&mut good, HEALTHZ).await
    })
    .await;
    assert!(
        matches!(served, Ok(Ok(200))),
        "the good client was not served within the header timeout + 1 s: {served:?} after {:?}",
        started.elapsed()
    );
    // Every trickler is closed: made room for others, or timed out.
    let mut open = 0;
    for s in &mut tricklers {
        if !closed_within(s, header_timeout * 3).await {
            open += 1;
        }
    }
    assert_eq!(open, 0, "trickling sockets still open");
    let metrics = reqwest::get(format!("{}/metrics", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let max: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("larder_connections_max "))
        .and_then(|v| v.parse().ok())
        .expect("larder_connections_max");
    assert!(max < 1024.0, "the cap follows the descriptor limit: {max}");
}

#[tokio::test]
async fn a_body_past_64_kib_is_no_head_and_is_served() {
    let app = spawn_with(|c| c.max_body_bytes = 1 << 20).await;
    app.table("t", "set").await;
    let value = serde_json::json!({"pad": "x".repeat(300 * 1024)});
    let r = app.put("t", "big", value.clone()).await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(app.get("t", "big").await.body["value"], value);
}
