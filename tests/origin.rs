//! The read-through miss path against a real local HTTP origin started by
//! the test.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use common::spawn_with;
use serde_json::json;

/// Requests the origin received, by key.
type Seen = Arc<Mutex<HashMap<String, usize>>>;

async fn origin_handler(
    State(seen): State<Seen>,
    Path(key): Path<String>,
) -> axum::response::Response {
    *seen.lock().unwrap().entry(key.clone()).or_default() += 1;
    match key.as_str() {
        "missing" => StatusCode::NOT_FOUND.into_response(),
        "boom" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        "text" => (StatusCode::OK, "not json").into_response(),
        "hang" => std::future::pending().await,
        k if k.starts_with("slow") => {
            tokio::time::sleep(Duration::from_millis(300)).await;
            axum::Json(json!({"id": k})).into_response()
        }
        k => axum::Json(json!({"id": k, "from": "origin"})).into_response(),
    }
}

async fn start_origin() -> (String, Seen) {
    let seen: Seen = Arc::default();
    let app = Router::new()
        .route("/users/{key}", get(origin_handler))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

async fn setup(timeout_ms: u64) -> (common::TestApp, Seen) {
    let (origin, seen) = start_origin().await;
    let app = spawn_with(|c| c.origin_allow = vec!["127.0.0.1:*".into()]).await;
    let r = app
        .create_table(json!({"name": "users", "origin": {
            "url": format!("{origin}/users/{{key}}"), "ttl_ms": 60000, "negative_ttl_ms": 60000, "timeout_ms": timeout_ms
        }}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    (app, seen)
}

fn count(seen: &Seen, key: &str) -> usize {
    seen.lock().unwrap().get(key).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_concurrent_misses_make_one_origin_request() {
    let (app, seen) = setup(5000).await;
    let url = app.entry_url("users", "slow-alice");
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let client = reqwest::Client::new();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let r = client.get(url).send().await.unwrap();
            let cache = r.headers()["x-cache"].to_str().unwrap().to_owned();
            (
                r.status().as_u16(),
                cache,
                r.json::<serde_json::Value>().await.unwrap(),
            )
        }));
    }
    for t in tasks {
        let (status, cache, body) = t.await.unwrap();
        assert_eq!(status, 200);
        assert!(cache == "MISS" || cache == "HIT");
        assert_eq!(body["value"], json!({"id": "slow-alice"}));
    }
    assert_eq!(count(&seen, "slow-alice"), 1, "exactly one origin request");
    let again = app.get("users", "slow-alice").await;
    assert_eq!(again.header("x-cache"), Some("HIT"));
    let ttl = again.body["ttl_ms"].as_u64().unwrap();
    assert!(
        ttl > 50_000 && ttl <= 60_000,
        "stored with the origin ttl: {ttl}"
    );
    let info = app.get_table("users").await.body;
    assert_eq!(info["stats"]["origin_fetches"], 1);
}

#[tokio::test]
async fn origin_404_is_404_and_remembered() {
    let (app, seen) = setup(2000).await;
    let r = app.get("users", "missing").await;
    r.assert_error(404, "key_not_found");
    assert_eq!(r.header("x-cache"), Some("MISS"));
    let r = app.get("users", "missing").await;
    r.assert_error(404, "key_not_found");
    assert_eq!(
        r.header("x-cache"),
        Some("HIT"),
        "answered from the negative cache"
    );
    assert_eq!(count(&seen, "missing"), 1);
}

#[tokio::test]
async fn origin_failures_are_502_and_not_cached() {
    let (app, seen) = setup(2000).await;
    app.get("users", "boom")
        .await
        .assert_error(502, "origin_error");
    app.get("users", "boom")
        .await
        .assert_error(502, "origin_error");
    assert_eq!(
        count(&seen, "boom"),
        2,
        "failures are retried, not remembered"
    );
    app.get("users", "text")
        .await
        .assert_error(502, "origin_error");
    assert_eq!(
        app.get_table("users").await.body["stats"]["origin_errors"],
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_origin_is_504_and_blocks_no_other_key() {
    let (app, _seen) = setup(300).await;
    let hang = {
        let client = app.client.clone();
        let url = app.entry_url("users", "hang");
        tokio::spawn(async move { client.get(url).send().await.unwrap().status().as_u16() })
    };
    // While that request waits on the origin, another key is served.
    let other = app.get("users", "bob").await;
    assert_eq!(other.status, 200);
    assert_eq!(other.body["value"]["id"], "bob");
    assert!(!hang.is_finished(), "the hanging request is still waiting");
    assert_eq!(hang.await.unwrap(), 504);
    let r = app.get("users", "hang").await;
    r.assert_error(504, "origin_timeout");
}

#[tokio::test]
async fn keys_are_percent_encoded_into_the_url() {
    let (app, seen) = setup(2000).await;
    let r = app.get("users", "a b/c").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["value"]["id"], "a b/c");
    assert_eq!(count(&seen, "a b/c"), 1);
}

#[tokio::test]
async fn origins_must_be_allowed_http_urls_with_a_key_slot() {
    let app = spawn_with(|c| c.origin_allow = vec!["127.0.0.1:9000".into()]).await;
    for url in [
        "http://127.0.0.1:9001/u/{key}",
        "http://10.0.0.1:9000/u/{key}",
        "http://127.0.0.1:9000/u/",
        "ftp://127.0.0.1:9000/u/{key}",
        "not a url {key}",
    ] {
        app.create_table(json!({"name": "o", "origin": {"url": url}}))
            .await
            .assert_error(400, "invalid_argument");
    }
    app.create_table(
        json!({"name": "o", "type": "bag", "origin": {"url": "http://127.0.0.1:9000/u/{key}"}}),
    )
    .await
    .assert_error(400, "invalid_argument");
    let ok = app
        .create_table(json!({"name": "o", "origin": {"url": "http://127.0.0.1:9000/u/{key}"}}))
        .await;
    assert_eq!(ok.status, 201, "{}", ok.text);
    assert_eq!(ok.body["origin"]["timeout_ms"], 2000, "defaults filled in");
    // https:// is an origin too (tests/origin_tls.rs fetches from one).
    let tls = app
        .create_table(json!({"name": "o2", "origin": {"url": "https://127.0.0.1:9000/u/{key}"}}))
        .await;
    assert_eq!(tls.status, 201, "{}", tls.text);
    // No allow list at all: no origins.
    let closed = common::spawn_app().await;
    closed
        .create_table(json!({"name": "o", "origin": {"url": "http://127.0.0.1:9000/u/{key}"}}))
        .await
        .assert_error(400, "invalid_argument");
}

#[tokio::test]
async fn a_write_made_while_the_origin_is_asked_is_not_overwritten() {
    let (app, seen) = setup(5000).await;
    let url = app.entry_url("users", "slow-bob");
    let client = app.client.clone();
    let miss = tokio::spawn(async move { client.get(url).send().await.unwrap() });
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while count(&seen, "slow-bob") == 0 {
        assert!(std::time::Instant::now() < deadline, "origin never asked");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let r = app.put("users", "slow-bob", json!({"id": "written"})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let answered: serde_json::Value = miss.await.unwrap().json().await.unwrap();
    assert_eq!(
        answered["value"],
        json!({"id": "written"}),
        "the miss answers with what is stored"
    );
    let r = app.get("users", "slow-bob").await;
    assert_eq!(r.body["value"], json!({"id": "written"}));
    assert_eq!(r.header("x-cache"), Some("HIT"));
}
