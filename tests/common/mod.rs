//! Test harness: start the real server on 127.0.0.1:0 with a fresh data
//! directory, and talk to it with reqwest.

#![allow(dead_code)]

pub mod child;
pub mod gate;
pub mod model;
pub mod pg;
pub mod recording;

use std::net::SocketAddr;
use std::sync::Arc;

use larder::app::{App, EngineWrapper, Parts};
use larder::clock::{Clock, ManualClock};
use larder::config::Config;
use reqwest::{Method, Response, StatusCode};
use serde_json::{json, Value};
use tokio::sync::oneshot;

/// A running server and a client for it. Dropping it stops the server.
pub struct TestApp {
    pub addr: SocketAddr,
    pub base: String,
    pub client: reqwest::Client,
    pub clock: Option<ManualClock>,
    pub store: larder::store::Store,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// Starts a server with default settings.
pub async fn spawn_app() -> TestApp {
    spawn_with(|_| {}).await
}

/// Starts a server after `tweak` adjusts its configuration.
pub async fn spawn_with(tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_inner(tweak, None).await
}

/// Starts a server whose clock only moves when the test says so.
pub async fn spawn_with_manual_clock() -> TestApp {
    spawn_inner(|_| {}, Some(ManualClock::new(1_700_000_000_000))).await
}

impl TestApp {
    /// Moves the manual clock forward.
    pub fn advance(&self, ms: u64) {
        self.clock.as_ref().expect("a manual clock").advance(ms);
    }
}

/// Starts a server on an existing data directory (a restart).
pub async fn spawn_on(dir: tempfile::TempDir) -> TestApp {
    spawn_in(dir, |_| {}, None, None).await
}

async fn spawn_inner(tweak: impl FnOnce(&mut Config), clock: Option<ManualClock>) -> TestApp {
    spawn_in(tempfile::tempdir().expect("temp dir"), tweak, clock, None).await
}

/// Starts a server whose durable engine is wrapped by `wrap`.
pub async fn spawn_with_engine(wrap: EngineWrapper) -> TestApp {
    spawn_in(
        tempfile::tempdir().expect("temp dir"),
        |_| {},
        None,
        Some(wrap),
    )
    .await
}

async fn spawn_in(
    dir: tempfile::TempDir,
    tweak: impl FnOnce(&mut Config),
    clock: Option<ManualClock>,
    wrap_engine: Option<EngineWrapper>,
) -> TestApp {
    let mut config = Config::for_tests(dir.path().join("data"));
    // Tests that move time by hand also sweep by hand.
    config.run_sweeper = clock.is_none();
    tweak(&mut config);
    let parts = Parts {
        clock: clock.clone().map(|c| Arc::new(c) as Arc<dyn Clock>),
        wrap_engine,
    };
    let app = App::build_with(config, parts).await.expect("server builds");
    let addr = app.local_addr().expect("bound address");
    let store = app.store();
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        app.run_until_stopped(async {
            let _ = rx.await;
        })
        .await
        .expect("server runs and stops cleanly");
    });
    let app = TestApp {
        addr,
        base: format!("http://{addr}"),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(64)
            .build()
            .expect("client"),
        clock,
        store,
        dir,
        stop: Some(tx),
        handle: Some(handle),
    };
    app.wait_ready().await;
    app
}

/// Polls `GET {base}/readyz` until it answers 200, for up to 30 seconds.
pub async fn wait_ready_at(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/readyz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "server not ready in time"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// Percent-encodes one path segment.
pub fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A response's status, headers and JSON body (Null when empty).
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    pub async fn from(resp: Response) -> Reply {
        let status = resp.status();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let body = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text.clone()))
        };
        Reply {
            status,
            headers,
            body,
            text,
        }
    }

    /// The error code of an error body.
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an error reply with the documented shape.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text);
        assert_eq!(self.code(), code, "body: {}", self.text);
        assert!(
            self.body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without message: {}",
            self.text
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "error content type"
        );
    }
}

impl TestApp {
    pub async fn wait_ready(&self) {
        wait_ready_at(&self.client, &self.base).await;
    }

    /// Stops the server gracefully and waits until it has written
    /// everything; returns its data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await.expect("server task");
        }
        std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"))
    }

    /// One sample of an unlabelled metric, read from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(self.url("/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from /metrics"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn entry_url(&self, table: &str, key: &str) -> String {
        self.url(&format!("/v1/tables/{}/entries/{}", enc(table), enc(key)))
    }

    /// Sends any request with an optional raw body and headers.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.client.request(method, self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        Reply::from(req.send().await.expect("request sent")).await
    }

    pub async fn create_table(&self, body: Value) -> Reply {
        Reply::from(
            self.client
                .post(self.url("/v1/tables"))
                .json(&body)
                .send()
                .await
                .expect("create"),
        )
        .await
    }

    /// Creates a table of `kind` and asserts success.
    pub async fn table(&self, name: &str, kind: &str) {
        let r = self.create_table(json!({"name": name, "type": kind})).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }

    pub async fn get_table(&self, name: &str) -> Reply {
        self.send(Method::GET, &format!("/v1/tables/{}", enc(name)), None, &[])
            .await
    }

    pub async fn put(&self, table: &str, key: &str, value: Value) -> Reply {
        self.put_with(table, key, value, "", &[]).await
    }

    pub async fn put_with(
        &self,
        table: &str,
        key: &str,
        value: Value,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self
            .client
            .put(format!("{}{}", self.entry_url(table, key), query))
            .body(value.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send().await.expect("put")).await
    }

    pub async fn get(&self, table: &str, key: &str) -> Reply {
        Reply::from(
            self.client
                .get(self.entry_url(table, key))
                .send()
                .await
                .expect("get"),
        )
        .await
    }

    pub async fn delete(&self, table: &str, key: &str) -> Reply {
        Reply::from(
            self.client
                .delete(self.entry_url(table, key))
                .send()
                .await
                .expect("delete"),
        )
        .await
    }

    pub async fn counter(&self, table: &str, key: &str, body: Value) -> Reply {
        Reply::from(
            self.client
                .post(format!("{}/counter", self.entry_url(table, key)))
                .body(body.to_string())
                .send()
                .await
                .expect("counter"),
        )
        .await
    }

    pub async fn scan(&self, table: &str, query: &str) -> Reply {
        self.send(
            Method::GET,
            &format!("/v1/tables/{}/entries{}", enc(table), query),
            None,
            &[],
        )
        .await
    }

    /// Every `(key, value)` of a full scan, following cursors.
    pub async fn scan_all(&self, table: &str, query: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let q = match &cursor {
                Some(c) if query.is_empty() => format!("?cursor={c}"),
                Some(c) => format!("{query}&cursor={c}"),
                None => query.to_owned(),
            };
            let r = self.scan(table, &q).await;
            assert_eq!(r.status, 200, "{}", r.text);
            for e in r.body["entries"].as_array().expect("entries") {
                out.push((
                    e["key"].as_str().expect("key").to_owned(),
                    e["value"].clone(),
                ));
            }
            match r.body["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => return out,
            }
        }
    }
}
