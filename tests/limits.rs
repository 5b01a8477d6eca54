//! Limits and logs: table count, load shedding, request timeout, and tokens
//! that never reach a log line.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use common::child::ChildServer;
use common::spawn_with;
use reqwest::Method;
use serde_json::json;

/// An origin whose every request hangs, to hold requests in flight, and
/// the count of requests it has received.
async fn hanging_origin() -> (String, Arc<AtomicUsize>) {
    let arrived = Arc::new(AtomicUsize::new(0));
    let seen = arrived.clone();
    let app = axum::Router::new().route(
        "/{key}",
        get(move || {
            seen.fetch_add(1, Ordering::SeqCst);
            async {
                std::future::pending::<()>().await;
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/{{key}}"), arrived)
}

#[tokio::test]
async fn the_table_count_is_limited() {
    let app = spawn_with(|c| c.max_tables = 2).await;
    app.table("a", "set").await;
    app.table("b", "set").await;
    app.create_table(json!({"name": "c"}))
        .await
        .assert_error(507, "table_limit");
    app.send(Method::DELETE, "/v1/tables/a", None, &[]).await;
    assert_eq!(app.create_table(json!({"name": "c"})).await.status, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn excess_load_is_shed_with_503_and_retry_after() {
    let (origin, arrived) = hanging_origin().await;
    let app = spawn_with(|c| {
        c.max_concurrent_requests = 2;
        c.origin_allow = vec!["127.0.0.1:*".into()];
    })
    .await;
    app.create_table(json!({"name": "o", "origin": {"url": origin, "timeout_ms": 60000}}))
        .await;
    // Two requests wait on the origin and hold both permits. One that was
    // shed before it got there (the other held one permit, a request of
    // ours the second) is sent again.
    let hold = |k: &str| {
        let client = app.client.clone();
        let url = app.entry_url("o", k);
        tokio::spawn(async move { client.get(url).send().await })
    };
    let mut held = vec![hold("a"), hold("b")];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while arrived.load(Ordering::SeqCst) < 2 {
        for (h, k) in held.iter_mut().zip(["a", "b"]) {
            if h.is_finished() {
                *h = hold(k);
            }
        }
        assert!(std::time::Instant::now() < deadline, "requests not held");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let shed = loop {
        let r = app.send(Method::GET, "/v1/tables", None, &[]).await;
        if r.status == 503 {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "never shed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    shed.assert_error(503, "unavailable");
    assert_eq!(shed.header("retry-after"), Some("1"));
    // Probes are never shed.
    assert_eq!(
        app.send(Method::GET, "/healthz", None, &[]).await.status,
        200
    );
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn requests_past_the_timeout_get_503() {
    let (origin, _) = hanging_origin().await;
    let app = spawn_with(|c| {
        c.request_timeout_ms = 200;
        c.origin_allow = vec!["127.0.0.1:*".into()];
    })
    .await;
    app.create_table(json!({"name": "o", "origin": {"url": origin, "timeout_ms": 60000}}))
        .await;
    let r = app.get("o", "k").await;
    r.assert_error(503, "unavailable");
}

#[tokio::test]
async fn tokens_never_appear_in_logs() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "s3cret-token-value-42";
    let tokens = format!("alice:{secret}");
    let server = ChildServer::start_with(
        dir.path(),
        &[
            ("LARDER_TOKENS", tokens.as_str()),
            ("LARDER_LOG", "debug"),
            ("LARDER_ACCESS_LOG", "true"),
        ],
    )
    .await;
    let client = reqwest::Client::new();
    let ok = client
        .post(format!("{}/v1/tables", server.base))
        .bearer_auth(secret)
        .body(r#"{"name":"t"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 201);
    let wrong = format!("{secret}-but-wrong");
    let bad = client
        .get(format!("{}/v1/tables", server.base))
        .bearer_auth(&wrong)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 401);
    client
        .get(format!("{}/v1/tables/t", server.base))
        .bearer_auth(secret)
        .send()
        .await
        .unwrap();
    let logs = server.log_text();
    assert!(
        logs.contains("\"principal\":\"alice\""),
        "requests are logged with their principal"
    );
    assert!(!logs.contains(secret), "a token leaked into the logs");
    assert!(
        !logs.contains("s3cret"),
        "a fragment of a token leaked into the logs"
    );
}
