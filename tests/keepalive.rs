//! Keep-alive connections stay usable when a request is answered before its
//! body is read (rejected by authentication, routing, access, or the body
//! limit, or by a handler that takes no body): requests refused before any
//! of the body was read (401, 413) close the connection, the others drain. A raw HTTP/1.1 client sends
//! each request's headers and body in separate writes, as real clients often
//! do, and checks that every request gets a well-formed response: either the
//! connection stays open, or the response says `Connection: close` and the
//! client reconnects. A reset or an unannounced close is a failure.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::spawn_with;
use serde_json::json;

const ALICE: &str = "alice-token-0001";
const BOB: &str = "bob-token-000002";
const LIMIT: usize = 1024;

/// One HTTP/1.1 connection that knows whether the server may still reuse it.
struct Conn {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
    reconnects: usize,
}

/// What came back for one request.
struct Answer {
    status: u16,
    close: bool,
}

impl Conn {
    fn new(addr: SocketAddr) -> Conn {
        Conn {
            addr,
            stream: None,
            reconnects: 0,
        }
    }

    fn stream(&mut self) -> &mut BufReader<TcpStream> {
        if self.stream.is_none() {
            let s = TcpStream::connect(self.addr).expect("connect");
            s.set_nodelay(true).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            self.stream = Some(BufReader::new(s));
            self.reconnects += 1;
        }
        self.stream.as_mut().unwrap()
    }

    /// Sends one request (headers, then the body in a second write) and
    /// reads its response.
    fn exchange(&mut self, head: &str, body: &[u8]) -> Result<Answer, String> {
        let stream = self.stream();
        let head = format!(
            "{head}\r\nHost: larder\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let sent = stream
            .get_mut()
            .write_all(head.as_bytes())
            .and_then(|()| stream.get_mut().write_all(body));
        if let Err(e) = sent {
            return Err(format!("send failed: {e}"));
        }
        let mut status_line = String::new();
        match stream.read_line(&mut status_line) {
            Ok(0) => return Err("connection closed without a response".into()),
            Err(e) => return Err(format!("read failed: {e}")),
            Ok(_) => {}
        }
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {status_line:?}"))?;
        let (mut length, mut close) = (0usize, false);
        loop {
            let mut line = String::new();
            stream
                .read_line(&mut line)
                .map_err(|e| format!("header read failed: {e}"))?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').ok_or("bad header")?;
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().map_err(|_| "bad length")?,
                "connection" => close = value.trim().eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        let mut payload = vec![0; length];
        stream
            .read_exact(&mut payload)
            .map_err(|e| format!("body read failed: {e}"))?;
        if status >= 400 {
            let v: serde_json::Value =
                serde_json::from_slice(&payload).map_err(|e| format!("error body: {e}"))?;
            if v["error"]["code"].as_str().is_none() {
                return Err(format!("error body without a code: {v}"));
            }
        }
        if close {
            self.stream = None;
        }
        Ok(Answer { status, close })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_rejected_before_their_body_is_read_keep_the_connection_usable() {
    let app = spawn_with(|c| {
        c.tokens = Some(format!("alice:{ALICE},bob:{BOB}"));
        c.max_body_bytes = LIMIT;
    })
    .await;
    let created = app
        .client
        .post(app.url("/v1/tables"))
        .bearer_auth(ALICE)
        .body(json!({"name": "mine", "access": "private"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let addr = app.addr;
    let outcome = tokio::task::spawn_blocking(move || {
        let mut conn = Conn::new(addr);
        let small = vec![b'x'; 300];
        let over = vec![b'x'; LIMIT + 200];
        let huge = vec![b'x'; LIMIT * 8];
        let as_alice = |line: &str| format!("{line}\r\nAuthorization: Bearer {ALICE}");
        let cases: Vec<(String, Vec<u8>, u16)> = vec![
            // No token.
            (
                "POST /v1/tables/mine/entries/k/take HTTP/1.1".into(),
                small.clone(),
                401,
            ),
            // Another principal's private table.
            (
                format!(
                    "POST /v1/tables/mine/entries/k/take HTTP/1.1\r\nAuthorization: Bearer {BOB}"
                ),
                small.clone(),
                403,
            ),
            // No such route; no such method on a route.
            (as_alice("POST /v1/nowhere HTTP/1.1"), small.clone(), 404),
            (
                as_alice("PATCH /v1/tables/mine/entries HTTP/1.1"),
                small.clone(),
                405,
            ),
            // Over the body limit, a little and a lot.
            (
                as_alice("PUT /v1/tables/mine/entries/k HTTP/1.1"),
                over,
                413,
            ),
            (
                as_alice("PUT /v1/tables/mine/entries/k HTTP/1.1"),
                huge,
                413,
            ),
            // A handler that takes no body, answering 404 for a missing key.
            (
                as_alice("POST /v1/tables/mine/entries/k/take HTTP/1.1"),
                small,
                404,
            ),
        ];
        let mut ok = 0;
        let mut closes = 0;
        let mut last_closed = false;
        for i in 0..1000 {
            let (head, body, want) = &cases[i % cases.len()];
            match conn.exchange(head, body) {
                Ok(a) => {
                    assert_eq!(a.status, *want, "request {i}: {head}");
                    ok += 1;
                    closes += usize::from(a.close);
                    last_closed = a.close;
                    // Refused before their body was read: closed, not
                    // drained.
                    if matches!(a.status, 401 | 413) {
                        assert!(a.close, "request {i}: {head}");
                    }
                }
                Err(e) => panic!("request {i} ({head}): {e}"),
            }
        }
        (ok, closes - usize::from(last_closed), conn.reconnects)
    })
    .await
    .unwrap();
    let (ok, closes_followed, reconnects) = outcome;
    assert_eq!(ok, 1000);
    // Every reconnect was announced by the response before it.
    assert_eq!(reconnects, closes_followed + 1);
}
