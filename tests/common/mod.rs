//! Test harness: start the real server on 127.0.0.1:0 with a fresh data
//! directory, and talk to it with reqwest.

#![allow(dead_code)]

pub mod certs;
pub mod child;
pub mod faults;
pub mod gate;
pub mod model;
pub mod pg;
pub mod recording;
pub mod sse;

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
    /// The admin listener's address, when the test asked for one.
    pub admin: Option<SocketAddr>,
    pub base: String,
    pub client: reqwest::Client,
    pub clock: Option<ManualClock>,
    pub store: larder::store::Store,
    pub dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
    /// Set by `spawn_cluster_app`: the other nodes and their database.
    cluster: Option<ClusterNodes>,
}

/// What a cluster-mode `TestApp` spreads its requests over.
struct ClusterNodes {
    /// Every node's base URL, this one's first.
    bases: Vec<String>,
    /// The next node to send to, round robin.
    next: std::sync::atomic::AtomicUsize,
    others: Vec<TestApp>,
    _pg: pg::PgServer,
}

/// Three nodes on one fresh PostgreSQL, seen as one `TestApp` that sends
/// each request to the next node in turn, creates tables with
/// `"persistence": "cluster"` unless told otherwise, and reads entries and
/// scans with `?consistent=true` (a plain read may lag another node's
/// write by the staleness bound). Requests made through `client` with
/// `url`/`entry_url` go to the first node only. `None` when no PostgreSQL
/// is installed (see `pg::PgServer::start`).
pub async fn spawn_cluster_app() -> Option<TestApp> {
    let pg = pg::PgServer::start()?;
    let url = pg.create_db("larder").await;
    let mut nodes = Vec::new();
    for _ in 0..3 {
        let url = url.clone();
        nodes.push(
            spawn_with(|c| {
                c.cluster_url = Some(url);
                c.cluster_poll_ms = 2;
            })
            .await,
        );
    }
    let mut app = nodes.remove(0);
    let mut bases = vec![app.base.clone()];
    bases.extend(nodes.iter().map(|n| n.base.clone()));
    app.cluster = Some(ClusterNodes {
        bases,
        next: std::sync::atomic::AtomicUsize::new(0),
        others: nodes,
        _pg: pg,
    });
    Some(app)
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
    spawn_with_manual_clock_and(|_| {}).await
}

/// Like [`spawn_with_manual_clock`], after `tweak` adjusts the
/// configuration.
pub async fn spawn_with_manual_clock_and(tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_inner(tweak, Some(ManualClock::new(1_700_000_000_000))).await
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

/// Starts a server on an existing data directory after `tweak` adjusts its
/// configuration.
pub async fn spawn_on_with(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestApp {
    spawn_in(dir, tweak, None, None).await
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
    let admin = app.admin_addr();
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
        admin,
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
        cluster: None,
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
        self.metric_as(name, None).await
    }

    /// [`TestApp::metric`], asked with `token` when authentication is on.
    pub async fn metric_as(&self, name: &str, token: Option<&str>) -> f64 {
        let mut req = self.client.get(self.url("/metrics"));
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        let text = req
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

    /// The text of `GET /metrics` (no token).
    pub async fn metrics_text(&self) -> String {
        let r = self.client.get(self.url("/metrics")).send().await;
        r.expect("metrics answer")
            .text()
            .await
            .expect("metrics text")
    }

    pub fn entry_url(&self, table: &str, key: &str) -> String {
        self.url(&format!("/v1/tables/{}/entries/{}", enc(table), enc(key)))
    }

    /// A request of `method` to `path` (with its query): on a cluster-mode
    /// app, to the next node, with `consistent=true` added to reads of
    /// tables.
    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = match &self.cluster {
            None => self.url(path),
            Some(c) => {
                let n = c.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let base = &c.bases[n % c.bases.len()];
                let read = method == Method::GET || method == Method::HEAD;
                if read && path.starts_with("/v1/tables/") && !path.contains("consistent=") {
                    let sep = if path.contains('?') { '&' } else { '?' };
                    format!("{base}{path}{sep}consistent=true")
                } else {
                    format!("{base}{path}")
                }
            }
        };
        self.client.request(method, url)
    }

    /// The path of an entry, percent-encoded.
    pub fn entry_path(&self, table: &str, key: &str) -> String {
        format!("/v1/tables/{}/entries/{}", enc(table), enc(key))
    }

    /// Sends any request with an optional raw body and headers.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut req = self.request(method, path);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        Reply::from(req.send().await.expect("request sent")).await
    }

    pub async fn create_table(&self, mut body: Value) -> Reply {
        let injected = self.cluster.is_some() && body.get("persistence").is_none();
        if injected {
            body["persistence"] = json!("cluster");
        }
        let reply = Reply::from(
            self.request(Method::POST, "/v1/tables")
                .json(&body)
                .send()
                .await
                .expect("create"),
        )
        .await;
        if injected && reply.status == 201 {
            assert_eq!(reply.body["persistence"], "cluster", "{}", reply.text);
        }
        reply
    }

    /// Creates a table of `kind` and asserts success.
    pub async fn table(&self, name: &str, kind: &str) {
        let r = self.create_table(json!({"name": name, "type": kind})).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }

    /// Posts an export stream to `/v1/tables/import` with `query`
    /// (`?name=…`, or empty).
    pub async fn import(&self, stream: String, query: &str) -> Reply {
        let path = format!("/v1/tables/import{query}");
        self.send(Method::POST, &path, Some(stream.into_bytes()), &[])
            .await
    }

    /// A table's export stream, as text.
    pub async fn export_text(&self, table: &str) -> String {
        let path = format!("/v1/tables/{}/export", enc(table));
        let r = self.send(Method::GET, &path, None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.text
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
            .request(
                Method::PUT,
                &format!("{}{}", self.entry_path(table, key), query),
            )
            .body(value.to_string());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Reply::from(req.send().await.expect("put")).await
    }

    pub async fn get(&self, table: &str, key: &str) -> Reply {
        Reply::from(
            self.request(Method::GET, &self.entry_path(table, key))
                .send()
                .await
                .expect("get"),
        )
        .await
    }

    pub async fn delete(&self, table: &str, key: &str) -> Reply {
        Reply::from(
            self.request(Method::DELETE, &self.entry_path(table, key))
                .send()
                .await
                .expect("delete"),
        )
        .await
    }

    pub async fn counter(&self, table: &str, key: &str, body: Value) -> Reply {
        Reply::from(
            self.request(
                Method::POST,
                &format!("{}/counter", self.entry_path(table, key)),
            )
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

    /// Inserts `(key, value)` objects with one bulk insert, asserting 200
    /// (nothing is sent for none).
    pub async fn bulk(&self, table: &str, objects: &[(String, Value)]) {
        if objects.is_empty() {
            return;
        }
        let items: Vec<Value> = objects
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let r = self
            .send(
                Method::POST,
                &format!("/v1/tables/{}/entries", enc(table)),
                Some(Value::Array(items).to_string().into_bytes()),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
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

/// Declares conformance tests, each twice: on tables of one node
/// (`local::NAME`) and on cluster tables through three nodes in turn
/// (`cluster::NAME`, see `spawn_cluster_app`), with the given name bound
/// to the `TestApp`. The cluster half skips, saying why, only when no
/// PostgreSQL is installed.
#[macro_export]
macro_rules! conformance {
    ($($(#[doc = $doc:literal])* async fn $name:ident($app:ident) $body:block)*) => {
        mod local {
            use super::*;
            $(
                $(#[doc = $doc])*
                #[tokio::test]
                async fn $name() {
                    let $app = $crate::common::spawn_app().await;
                    $body
                }
            )*
        }
        mod cluster {
            use super::*;
            $(
                $(#[doc = $doc])*
                #[tokio::test]
                async fn $name() {
                    let Some($app) = $crate::common::spawn_cluster_app().await else {
                        return;
                    };
                    $body
                }
            )*
        }
    };
}
