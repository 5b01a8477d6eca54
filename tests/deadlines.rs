//! Request deadlines and early refusals, over real sockets: a body that
//! stalls gets 408 within the request deadline (with or without an
//! `Idempotency-Key`) and applies nothing; a declared body over the limit
//! is 413 before any of it is read and before `100 Continue`; requests
//! refused before their body was read close the connection; a write that
//! has begun to apply is never abandoned, however late it answers.

mod common;

use std::time::{Duration, Instant};

use common::gate::{exclusive, Gate};
use common::spawn_with;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Everything the server sends until it closes (or 10 s pass).
async fn read_all(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// The status of the first response in `text`.
fn status(text: &str) -> u16 {
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {text:?}"))
}

/// Sends the head of a PUT that declares `declared` bytes of body and
/// then sends only `sent` of them.
async fn stalled_put(
    addr: std::net::SocketAddr,
    path: &str,
    extra: &str,
    declared: usize,
    sent: usize,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head =
        format!("PUT {path} HTTP/1.1\r\nHost: larder\r\nContent-Length: {declared}\r\n{extra}\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&vec![b'1'; sent]).await.unwrap();
    s
}

#[tokio::test]
async fn a_body_that_stalls_gets_408_and_applies_nothing() {
    let app = spawn_with(|c| c.request_timeout_ms = 300).await;
    app.table("t", "set").await;
    let started = Instant::now();
    let mut s = stalled_put(app.addr, "/v1/tables/t/entries/k", "", 100, 10).await;
    let answer = read_all(&mut s).await;
    assert_eq!(status(&answer), 408, "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered at once"
    );
    assert_eq!(app.get("t", "k").await.status, 404);
}

#[tokio::test]
async fn a_keyed_body_that_stalls_gets_408_and_its_retry_applies_once() {
    let app = spawn_with(|c| c.request_timeout_ms = 300).await;
    app.table("t", "set").await;
    let path = "/v1/tables/t/entries/n/counter";
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let body = br#"{"incr":1,"default":0}"#;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: larder\r\nIdempotency-Key: k1\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..5]).await.unwrap();
    let answer = read_all(&mut s).await;
    assert_eq!(status(&answer), 408, "{answer}");
    // The key was not left claimed: the retry runs, once.
    for _ in 0..2 {
        let r = app
            .client
            .post(app.url(path))
            .header("Idempotency-Key", "k1")
            .body(&body[..])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<serde_json::Value>().await.unwrap()["value"], 1);
    }
}

#[tokio::test]
async fn a_declared_body_over_the_limit_is_413_before_100_continue() {
    let app = spawn_with(|c| c.max_body_bytes = 1024).await;
    app.table("t", "set").await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let head = "PUT /v1/tables/t/entries/k HTTP/1.1\r\nHost: larder\r\n\
                Content-Length: 1000000000000\r\nExpect: 100-continue\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = read_all(&mut s).await;
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert_eq!(status(&answer), 413, "{answer}");
    assert!(
        answer.contains("\"code\":\"payload_too_large\""),
        "{answer}"
    );
    // The connection was closed, not drained: read_all saw its end.
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    // Imports are bound by their own limit, not the body limit.
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    let head = "POST /v1/tables/import HTTP/1.1\r\nHost: larder\r\n\
                Content-Length: 2048\r\nExpect: 100-continue\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut first))
        .await
        .expect("an answer")
        .unwrap();
    let first = String::from_utf8_lossy(&first[..n]);
    assert!(first.starts_with("HTTP/1.1 100"), "{first}");
}

#[tokio::test]
async fn a_request_refused_before_its_body_closes_the_connection() {
    let app = spawn_with(|c| c.tokens = Some("alice:alice-token-0001".into())).await;
    let mut s = TcpStream::connect(app.addr).await.unwrap();
    // The body is declared and never sent: a drain would wait for it.
    let head = "PUT /v1/tables/t/entries/k HTTP/1.1\r\nHost: larder\r\nContent-Length: 500\r\n\r\n";
    s.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let answer = read_all(&mut s).await;
    assert_eq!(status(&answer), 401, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "closed at once");
}

#[tokio::test]
async fn a_write_that_has_begun_is_never_abandoned() {
    let _serial = exclusive().await;
    let app = spawn_with(|c| c.request_timeout_ms = 200).await;
    app.create_table(json!({"name": "s", "persistence": "sync"}))
        .await;
    let mut gate = Gate::pause_first("writeback-after-snapshot");
    let put = {
        let client = app.client.clone();
        let url = app.entry_url("s", "k");
        tokio::spawn(async move { client.put(url).body("1").send().await.unwrap() })
    };
    gate.reached().await;
    // Hold the write past its deadline: it has applied in memory and
    // waits for its flush.
    tokio::time::sleep(Duration::from_millis(600)).await;
    gate.release();
    let answer = put.await.unwrap();
    assert_eq!(answer.status(), 201, "answered late, not abandoned");
    assert_eq!(app.get("s", "k").await.status, 200);
}
