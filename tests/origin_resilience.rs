//! Protecting an origin that fails: the circuit breaker (opens after
//! failures in a row, refuses with 503 `origin_unavailable` without calling
//! the origin, lets one trial through after its time), the cap on fetches
//! in flight to one origin, and origin headers filled from the
//! environment (never shown in table info).

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use serde_json::json;

use common::child::ChildServer;
use common::{spawn_with, spawn_with_manual_clock_and};

/// What the test origin does and saw.
#[derive(Default)]
struct Origin {
    healthy: AtomicBool,
    hits: AtomicUsize,
    /// Fetches being answered now, and the most seen at once.
    current: AtomicUsize,
    most: AtomicUsize,
    /// When set, every fetch waits for a permit before answering.
    gate: Option<tokio::sync::Semaphore>,
    /// The `X-Api-Key` header of each fetch.
    keys: Mutex<Vec<String>>,
}

async fn answer(
    State(o): State<Arc<Origin>>,
    Path(key): Path<String>,
    headers: HeaderMap,
) -> axum::response::Response {
    let fetch = o.hits.fetch_add(1, Ordering::SeqCst) + 1;
    if let Some(k) = headers.get("x-api-key") {
        o.keys
            .lock()
            .unwrap()
            .push(k.to_str().unwrap_or_default().to_owned());
    }
    let now = o.current.fetch_add(1, Ordering::SeqCst) + 1;
    o.most.fetch_max(now, Ordering::SeqCst);
    if let Some(gate) = &o.gate {
        gate.acquire().await.unwrap().forget();
    }
    o.current.fetch_sub(1, Ordering::SeqCst);
    if key.starts_with("gone") {
        StatusCode::NOT_FOUND.into_response()
    } else if o.healthy.load(Ordering::SeqCst) {
        axum::Json(json!({"id": key, "fetch": fetch})).into_response()
    } else {
        StatusCode::INTERNAL_SERVER_ERROR.into_response()
    }
}

async fn start_origin(origin: Arc<Origin>) -> String {
    let app = Router::new()
        .route("/items/{key}", get(answer))
        .with_state(origin);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("127.0.0.1:{}", addr.port())
}

fn breaker_metric(text: &str, origin: &str) -> Option<u8> {
    let prefix = format!("larder_origin_breaker_open{{origin=\"{origin}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn the_breaker_opens_after_failures_and_a_trial_closes_it() {
    let origin = Arc::new(Origin::default());
    let host = start_origin(origin.clone()).await;
    let app = spawn_with_manual_clock_and(|c| {
        c.origin_allow = vec!["127.0.0.1:*".into()];
        c.origin_breaker_failures = 3;
        c.origin_breaker_ms = 5000;
    })
    .await;
    let r = app
        .create_table(json!({"name": "items", "origin": {
            "url": format!("http://{host}/items/{{key}}"), "negative_ttl_ms": 1
        }}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let hits = || origin.hits.load(Ordering::SeqCst);
    let metrics = || app.metrics_text();

    // A 404 is an answer, not a failure: the breaker stays closed.
    for i in 0..4 {
        assert_eq!(app.get("items", &format!("gone{i}")).await.status, 404);
    }
    assert_eq!(hits(), 4);
    assert_eq!(breaker_metric(&metrics().await, &host), Some(0));

    // Three failures in a row: each is a 502, each called the origin.
    for i in 0..3 {
        let r = app.get("items", &format!("a{i}")).await;
        assert_eq!(r.status, 502, "{}", r.text);
    }
    assert_eq!(hits(), 7);
    // Open: 503 at once, the origin not called.
    for i in 0..4 {
        let r = app.get("items", &format!("b{i}")).await;
        assert_eq!(r.status, 503, "{}", r.text);
        assert_eq!(r.body["error"]["code"], "origin_unavailable");
        assert!(r.headers.contains_key("retry-after"));
    }
    assert_eq!(hits(), 7);
    let text = metrics().await;
    assert_eq!(breaker_metric(&text, &host), Some(1), "{text}");

    // After the open time one trial goes through; it fails: open again.
    app.advance(5000);
    assert_eq!(app.get("items", "c0").await.status, 502);
    assert_eq!(hits(), 8);
    assert_eq!(app.get("items", "c1").await.status, 503);
    assert_eq!(hits(), 8);

    // The origin recovers; the next trial closes the breaker.
    origin.healthy.store(true, Ordering::SeqCst);
    app.advance(5000);
    let r = app.get("items", "d0").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["value"]["id"], "d0");
    let r = app.get("items", "d1").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(hits(), 10);
    let text = metrics().await;
    assert_eq!(breaker_metric(&text, &host), Some(0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_most_origin_max_inflight_fetches_reach_one_origin() {
    let origin = Arc::new(Origin {
        healthy: AtomicBool::new(true),
        gate: Some(tokio::sync::Semaphore::new(0)),
        ..Origin::default()
    });
    let host = start_origin(origin.clone()).await;
    let app = spawn_with(|c| {
        c.origin_allow = vec!["127.0.0.1:*".into()];
        c.origin_max_inflight = 2;
    })
    .await;
    let r = app
        .create_table(json!({"name": "items", "origin": {
            "url": format!("http://{host}/items/{{key}}"), "timeout_ms": 20000
        }}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);

    let mut tasks = Vec::new();
    for i in 0..6 {
        let url = app.entry_url("items", &format!("k{i}"));
        tasks.push(tokio::spawn(async move {
            reqwest::get(url).await.unwrap().status().as_u16()
        }));
    }
    until("two fetches to start", || {
        origin.current.load(Ordering::SeqCst) == 2
    })
    .await;
    // Time for a fetch past the cap to show up, were it let through.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(origin.current.load(Ordering::SeqCst), 2);
    origin.gate.as_ref().unwrap().add_permits(100);
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(origin.most.load(Ordering::SeqCst), 2);
    assert_eq!(origin.hits.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn origin_headers_come_from_the_environment_and_are_never_shown() {
    let origin = Arc::new(Origin {
        healthy: AtomicBool::new(true),
        ..Origin::default()
    });
    let host = start_origin(origin.clone()).await;
    let data = tempfile::tempdir().unwrap();
    let server = ChildServer::start_with(
        data.path(),
        &[
            ("LARDER_ORIGIN_ALLOW", "127.0.0.1:*"),
            ("LARDER_ORIGIN_API_KEY", "s3cret-value"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let create = |name: &str, template: &str| {
        client
            .post(format!("{}/v1/tables", server.base))
            .json(&json!({"name": name, "origin": {
                "url": format!("http://{host}/items/{{key}}"),
                "headers": {"X-Api-Key": template}
            }}))
            .send()
    };
    let r = create("keyed", "${LARDER_ORIGIN_API_KEY}").await.unwrap();
    assert_eq!(r.status(), 201);
    let info = r.text().await.unwrap();
    assert!(info.contains("${LARDER_ORIGIN_API_KEY}"), "{info}");
    assert!(!info.contains("s3cret-value"), "{info}");

    let r = reqwest::get(server.entry_url("keyed", "k1")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        *origin.keys.lock().unwrap(),
        vec!["s3cret-value".to_owned()]
    );
    let info = reqwest::get(format!("{}/v1/tables/keyed", server.base))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!info.contains("s3cret-value"), "{info}");

    // A variable outside LARDER_ORIGIN_*: refused at create.
    let r = create("home", "${HOME}").await.unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_argument");
    // An unset one: refused at create, naming it.
    let r = create("unset", "${LARDER_ORIGIN_NOT_SET}").await.unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_argument");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("LARDER_ORIGIN_NOT_SET"), "{body}");
    let r = reqwest::get(format!("{}/v1/tables/unset", server.base))
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(origin.hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn an_origin_header_variable_gone_after_a_restart_fails_fetches_not_the_load() {
    let origin = Arc::new(Origin {
        healthy: AtomicBool::new(true),
        ..Origin::default()
    });
    let host = start_origin(origin.clone()).await;
    let data = tempfile::tempdir().unwrap();
    let allow = ("LARDER_ORIGIN_ALLOW", "127.0.0.1:*");
    let mut server =
        ChildServer::start_with(data.path(), &[allow, ("LARDER_ORIGIN_API_KEY", "v1")]).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/tables", server.base))
        .json(&json!({"name": "keyed", "persistence": "sync", "origin": {
            "url": format!("http://{host}/items/{{key}}"),
            "headers": {"X-Api-Key": "${LARDER_ORIGIN_API_KEY}"}
        }}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(server.terminate().code(), Some(0));

    // Started again without the variable: the table loads, its misses get
    // 502 naming the variable, and the origin is never called.
    let server = ChildServer::start_with(data.path(), &[allow]).await;
    let info = reqwest::get(format!("{}/v1/tables/keyed", server.base))
        .await
        .unwrap();
    assert_eq!(info.status(), 200);
    let r = reqwest::get(server.entry_url("keyed", "k1")).await.unwrap();
    assert_eq!(r.status(), 502);
    let body: serde_json::Value = r.json().await.unwrap();
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("LARDER_ORIGIN_API_KEY"), "{body}");
    assert_eq!(origin.hits.load(Ordering::SeqCst), 0);
}

/// Polls `check` until it holds, for up to 20 seconds.
async fn until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hits_near_expiry_refresh_once_in_the_background_and_writes_win() {
    let origin = Arc::new(Origin {
        healthy: AtomicBool::new(true),
        gate: Some(tokio::sync::Semaphore::new(0)),
        ..Origin::default()
    });
    let host = start_origin(origin.clone()).await;
    let app = spawn_with_manual_clock_and(|c| c.origin_allow = vec!["127.0.0.1:*".into()]).await;
    let r = app
        .create_table(json!({"name": "items", "origin": {
            "url": format!("http://{host}/items/{{key}}"),
            "ttl_ms": 10000, "refresh_ahead_ms": 3000
        }}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["origin"]["refresh_ahead_ms"], 3000);
    let gate = origin.gate.as_ref().unwrap();
    // The miss: one fetch.
    gate.add_permits(1);
    let r = app.get("items", "k").await;
    assert_eq!(r.body["value"]["fetch"], 1);
    // Far from expiry: no refresh.
    app.advance(6000);
    assert_eq!(app.get("items", "k").await.body["value"]["fetch"], 1);
    assert_eq!(origin.hits.load(Ordering::SeqCst), 1);

    // 2 s left, within refresh_ahead_ms: 20 hits at once are answered at
    // once from memory while one refresh waits at the origin.
    app.advance(2000);
    let mut hits = Vec::new();
    for _ in 0..20 {
        let url = app.entry_url("items", "k");
        hits.push(tokio::spawn(async move {
            let r = reqwest::get(url).await.unwrap();
            let cache = r.headers()["x-cache"].to_str().unwrap().to_owned();
            let body: serde_json::Value = r.json().await.unwrap();
            (cache, body["value"]["fetch"].clone())
        }));
    }
    for h in hits {
        assert_eq!(h.await.unwrap(), ("HIT".to_owned(), json!(1)));
    }
    until("the refresh to reach the origin", || {
        origin.current.load(Ordering::SeqCst) == 1
    })
    .await;
    gate.add_permits(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = app.get("items", "k").await;
        if r.body["value"]["fetch"] == 2 {
            // A fresh TTL came with it.
            assert_eq!(r.body["ttl_ms"], 10000);
            break;
        }
        assert!(Instant::now() < deadline, "the refresh never landed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        origin.hits.load(Ordering::SeqCst),
        2,
        "one refresh for 20 hits"
    );

    // Near expiry again; a client writes while the refresh is at the
    // origin: the client's value stays.
    app.advance(8000);
    assert_eq!(app.get("items", "k").await.body["value"]["fetch"], 2);
    until("the second refresh to reach the origin", || {
        origin.current.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(app
        .put("items", "k", json!({"mine": true}))
        .await
        .status
        .is_success());
    gate.add_permits(1);
    until("the origin to answer", || {
        origin.current.load(Ordering::SeqCst) == 0
    })
    .await;
    // Time for the refresh to try its store, were it to overwrite.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        app.get("items", "k").await.body["value"],
        json!({"mine": true})
    );
    assert_eq!(origin.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_writers_no_cache_fetches_from_the_origin_and_a_readers_is_ignored() {
    let origin = Arc::new(Origin {
        healthy: AtomicBool::new(true),
        ..Origin::default()
    });
    let host = start_origin(origin.clone()).await;
    let app = spawn_with(|c| {
        c.origin_allow = vec!["127.0.0.1:*".into()];
        c.tokens = Some("admin:admin-token-1,bob:bob-token-1".into());
    })
    .await;
    let r = app
        .client
        .post(app.url("/v1/tables"))
        .bearer_auth("admin-token-1")
        .json(&json!({"name": "items", "access": "protected", "origin": {
            "url": format!("http://{host}/items/{{key}}")
        }}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let get = |token: &'static str, no_cache: bool| {
        let mut req = app
            .client
            .get(app.entry_url("items", "k"))
            .bearer_auth(token);
        if no_cache {
            req = req.header("cache-control", "no-cache");
        }
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.status(), 200);
            let cache = r.headers()["x-cache"].to_str().unwrap().to_owned();
            let body: serde_json::Value = r.json().await.unwrap();
            (cache, body["value"]["fetch"].as_u64().unwrap())
        }
    };
    assert_eq!(get("bob-token-1", false).await, ("MISS".into(), 1));
    assert_eq!(get("bob-token-1", false).await, ("HIT".into(), 1));
    // bob may only read: his no-cache is ignored.
    assert_eq!(get("bob-token-1", true).await, ("HIT".into(), 1));
    assert_eq!(origin.hits.load(Ordering::SeqCst), 1);
    // The admin may write: the origin is asked, and its value replaces
    // the cached one for everybody.
    assert_eq!(get("admin-token-1", true).await, ("MISS".into(), 2));
    assert_eq!(get("bob-token-1", false).await, ("HIT".into(), 2));
    assert_eq!(origin.hits.load(Ordering::SeqCst), 2);
}

/// A table on `host` whose fetched entries live 10 s and are kept 30 s
/// more for stale-if-error, on a server whose breaker opens after 3
/// failures for 5 s.
async fn stale_app(host: &str, max_stale: u64) -> common::TestApp {
    let app = spawn_with_manual_clock_and(|c| {
        c.origin_allow = vec!["127.0.0.1:*".into()];
        c.origin_breaker_failures = 3;
        c.origin_breaker_ms = 5000;
        c.max_stale_entries = max_stale;
    })
    .await;
    let r = app
        .create_table(json!({"name": "items", "origin": {
            "url": format!("http://{host}/items/{{key}}"),
            "ttl_ms": 10000, "stale_if_error_ms": 30000
        }}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["origin"]["stale_if_error_ms"], 30000);
    app
}

#[tokio::test]
async fn an_expired_entry_is_served_stale_while_the_origin_fails_within_its_window() {
    let origin = Arc::new(Origin {
        healthy: AtomicBool::new(true),
        ..Origin::default()
    });
    let host = start_origin(origin.clone()).await;
    let app = stale_app(&host, 100).await;
    let hits = || origin.hits.load(Ordering::SeqCst);
    let r = app.get("items", "k").await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-cache")),
        (200, Some("MISS"))
    );
    let etag = r.header("etag").unwrap().to_owned();

    // Expired, and the origin fails: the old value, marked STALE, and not
    // to be kept by caches.
    origin.healthy.store(false, Ordering::SeqCst);
    app.advance(11_000);
    let r = app.get("items", "k").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("x-cache"), Some("STALE"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    assert_eq!(r.header("etag"), Some(etag.as_str()));
    assert_eq!(r.body["value"], json!({"id": "k", "fetch": 1}));
    assert_eq!(hits(), 2);
    // Out of sight of everything else.
    let head = app
        .send(
            reqwest::Method::HEAD,
            &app.entry_path("items", "k"),
            None,
            &[],
        )
        .await;
    assert_eq!(head.status, 404);
    assert_eq!(app.scan("items", "").await.body["entries"], json!([]));

    // The sweeper takes it out of the table; the copy stays, counted.
    app.store.purge_expired(1000);
    assert_eq!(app.get_table("items").await.body["size"], 0);
    let stale = "larder_table_stale_entries{table=\"items\"}";
    assert_eq!(app.metric(stale).await, 1.0);
    assert!(app.metric("larder_memory_bytes{kind=\"stale\"}").await > 0.0);
    // Two more failures open the breaker; the copy is served without
    // calling the origin.
    for _ in 0..2 {
        assert_eq!(app.get("items", "k").await.header("x-cache"), Some("STALE"));
    }
    assert_eq!(hits(), 4);
    let r = app.get("items", "k").await;
    assert_eq!(r.header("x-cache"), Some("STALE"), "{}", r.text);
    assert_eq!(hits(), 4);
    let served = "larder_table_stale_served_total{table=\"items\"}";
    assert_eq!(app.metric(served).await, 4.0);
    // A key never fetched has no copy: the breaker's 503.
    let r = app.get("items", "other").await;
    assert_eq!(r.status, 503, "{}", r.text);

    // Past the window: gone, and the origin's failure shows.
    app.advance(30_000);
    let r = app.get("items", "k").await;
    assert_eq!(r.status, 502, "{}", r.text);
    app.store.purge_expired(1000);
    assert_eq!(app.metric(stale).await, 0.0);
    assert_eq!(app.metric("larder_memory_bytes{kind=\"stale\"}").await, 0.0);

    // The origin back: fresh values again.
    origin.healthy.store(true, Ordering::SeqCst);
    app.advance(5000);
    let r = app.get("items", "k").await;
    assert_eq!(
        (r.status.as_u16(), r.header("x-cache")),
        (200, Some("MISS"))
    );
}

#[tokio::test]
async fn deleted_keys_and_keys_the_origin_lost_never_come_back_stale() {
    let origin = Arc::new(Origin {
        healthy: AtomicBool::new(true),
        ..Origin::default()
    });
    let host = start_origin(origin.clone()).await;
    let app = stale_app(&host, 100).await;
    for key in ["a", "b", "gone1"] {
        app.put_with("items", key, json!(key), "?ttl_ms=1000", &[])
            .await;
    }
    app.advance(2000);
    app.store.purge_expired(1000);
    let stale = "larder_table_stale_entries{table=\"items\"}";
    assert_eq!(app.metric(stale).await, 3.0);
    // A client's DELETE drops the copy.
    assert_eq!(app.delete("items", "a").await.status, 204);
    assert_eq!(app.metric(stale).await, 2.0);
    // The origin answering 404 drops it too.
    assert_eq!(app.get("items", "gone1").await.status, 404);
    assert_eq!(app.metric(stale).await, 1.0);
    origin.healthy.store(false, Ordering::SeqCst);
    assert_eq!(app.get("items", "a").await.status, 502);
    let r = app.get("items", "b").await;
    assert_eq!(r.header("x-cache"), Some("STALE"), "{}", r.text);
    assert_eq!(r.body["value"], "b");
    // A clear drops every copy.
    let r = app
        .send(
            reqwest::Method::DELETE,
            "/v1/tables/items/entries",
            None,
            &[],
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    assert_eq!(app.metric(stale).await, 0.0);
    assert_eq!(app.get("items", "b").await.status, 502);
}

#[tokio::test]
async fn stale_copies_stop_at_max_stale_entries() {
    let origin = Arc::new(Origin::default());
    let host = start_origin(origin.clone()).await;
    let app = stale_app(&host, 2).await;
    for i in 0..5 {
        app.put_with("items", &format!("k{i}"), json!(i), "?ttl_ms=1000", &[])
            .await;
    }
    app.advance(2000);
    app.store.purge_expired(1000);
    let stale = "larder_table_stale_entries{table=\"items\"}";
    assert_eq!(app.metric(stale).await, 2.0);
    let served: Vec<bool> = served_stale(&app).await;
    assert_eq!(served.iter().filter(|s| **s).count(), 2, "{served:?}");
    // Dropping the table gives its copies' memory back.
    let r = app
        .send(reqwest::Method::DELETE, "/v1/tables/items", None, &[])
        .await;
    assert!(r.status.is_success(), "{}", r.text);
    assert_eq!(app.metric("larder_memory_bytes{kind=\"stale\"}").await, 0.0);
}

/// For each of the 5 keys, whether a GET (the origin failing) served it
/// stale.
async fn served_stale(app: &common::TestApp) -> Vec<bool> {
    let mut out = Vec::new();
    for i in 0..5 {
        let r = app.get("items", &format!("k{i}")).await;
        out.push(r.header("x-cache") == Some("STALE"));
    }
    out
}
