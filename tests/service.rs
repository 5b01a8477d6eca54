//! Service endpoints, Swagger UI, the committed OpenAPI spec, and graceful stop.

mod common;

use common::spawn_app;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn health_and_readiness() {
    let app = spawn_app().await;
    let h = app.send(Method::GET, "/healthz", None, &[]).await;
    assert_eq!(h.status, 200);
    assert_eq!(h.body, json!({"status": "ok"}));
    let r = app.send(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, json!({"status": "ready"}));
    assert!(h.header("x-request-id").is_some());
}

#[tokio::test]
async fn swagger_ui_is_served_from_the_binary() {
    let app = spawn_app().await;
    let page = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    let init = app
        .client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(init.status(), 200);
    assert!(init.text().await.unwrap().contains("/openapi.json"));
    let bundle = app
        .client
        .get(app.url("/docs/swagger-ui-bundle.js"))
        .send()
        .await
        .unwrap();
    assert_eq!(bundle.status(), 200);
    assert!(
        bundle.bytes().await.unwrap().len() > 100_000,
        "the bundle itself, not a CDN link"
    );
}

#[tokio::test]
async fn the_served_spec_is_the_committed_spec() {
    let app = spawn_app().await;
    let served: serde_json::Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let generated = serde_json::to_value(larder::api::openapi()).unwrap();
    assert_eq!(served, generated);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi/openapi.json");
    let pretty = serde_json::to_string_pretty(&generated).unwrap() + "\n";
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(path, &pretty).unwrap();
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == pretty,
        "openapi/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test --test service` and commit it"
    );
}

#[tokio::test]
async fn the_spec_documents_every_route_of_the_contract() {
    let spec = serde_json::to_value(larder::api::openapi()).unwrap();
    let paths = &spec["paths"];
    for (path, methods) in [
        ("/v1/tables", &["post", "get"][..]),
        ("/v1/tables/{table}", &["get", "patch", "delete"]),
        ("/v1/tables/{table}/entries", &["delete", "post", "get"]),
        ("/v1/tables/{table}/sync", &["post"]),
        (
            "/v1/tables/{table}/entries/{key}",
            &["get", "head", "put", "delete", "patch"],
        ),
        ("/v1/tables/{table}/entries/{key}/delete_object", &["post"]),
        ("/v1/tables/{table}/entries/{key}/take", &["post"]),
        ("/v1/tables/{table}/entries/{key}/counter", &["post"]),
        ("/healthz", &["get"]),
        ("/readyz", &["get"]),
    ] {
        for m in methods {
            let op = &paths[path][m];
            assert!(op.is_object(), "{m} {path} missing from the spec");
            assert!(
                op["summary"].as_str().is_some_and(|s| !s.is_empty()),
                "{m} {path} summary"
            );
            assert!(
                op["description"].as_str().is_some_and(|s| !s.is_empty()),
                "{m} {path} description"
            );
        }
    }
}

#[tokio::test]
async fn a_stop_lets_in_flight_requests_finish() {
    let dir = tempfile::tempdir().unwrap();
    let app = larder::app::App::build(larder::config::Config::for_tests(dir.path()))
        .await
        .unwrap();
    let addr = app.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(app.run_until_stopped(async {
        let _ = rx.await;
    }));
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");
    common::wait_ready_at(&client, &base).await;
    client
        .post(format!("{base}/v1/tables"))
        .body(r#"{"name":"t"}"#)
        .send()
        .await
        .unwrap();
    // Many requests in flight when the stop arrives: each gets a real answer.
    let mut inflight = Vec::new();
    for i in 0..50 {
        let c = client.clone();
        let url = format!("{base}/v1/tables/t/entries/k{i}");
        inflight.push(tokio::spawn(
            async move { c.put(url).body("1").send().await },
        ));
    }
    tx.send(()).unwrap();
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(10), server)
        .await
        .expect("server stops in time")
        .expect("server task");
    assert!(stopped.is_ok());
    for r in inflight {
        // A request either completed before the stop or was never accepted;
        // none gets a broken answer.
        if let Ok(resp) = r.await.unwrap() {
            assert!(resp.status().is_success(), "{}", resp.status());
        }
    }
}

#[tokio::test]
async fn v1_and_readyz_answer_503_until_recovery_is_done() {
    use tower::ServiceExt;
    let dir = tempfile::tempdir().unwrap();
    let store = larder::store::Store::new(std::sync::Arc::new(larder::clock::SystemClock));
    let durability = larder::persist::Durability::open(dir.path(), store.clone()).unwrap();
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let state = larder::api::AppState::new(larder::api::Services {
        tables: larder::tables::Tables::new(store, durability, None, Default::default(), 10),
        ready: ready.clone(),
        metrics: larder::api::metrics::Metrics::new(),
        origins: larder::api::origin::Origins::new(vec![], 1024),
        tokens: Default::default(),
        rates: Default::default(),
        limits: larder::api::Limits::new(16, std::time::Duration::from_secs(5), 1024),
        request_ids: Default::default(),
        idempotency: larder::api::idempotency::Idempotency::new(
            60_000,
            1 << 20,
            std::sync::Arc::default(),
        ),
        connections: std::sync::Arc::new(larder::net::Connections::new(larder::net::ConnLimits {
            max_connections: 16,
            header_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(60),
        })),
        admin_connections: None,
        tls: None,
    });
    let router = larder::api::build(
        state,
        &larder::api::HttpOptions {
            max_body_bytes: 1024,
            access_log: false,
        },
    );
    let call = |path: &'static str| {
        let router = router.clone();
        async move {
            let resp = router
                .oneshot(
                    axum::http::Request::get(path)
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let retry = resp.headers().get("retry-after").is_some();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (
                status,
                retry,
                serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default(),
            )
        }
    };
    let (status, retry, body) = call("/v1/tables").await;
    assert_eq!((status, retry), (503, true));
    assert_eq!(body["error"]["code"], "unavailable");
    assert_eq!(call("/readyz").await.0, 503);
    assert_eq!(
        call("/healthz").await.0,
        200,
        "liveness does not wait for recovery"
    );
    ready.store(true, std::sync::atomic::Ordering::Release);
    assert_eq!(call("/v1/tables").await.0, 200);
    assert_eq!(call("/readyz").await.0, 200);
}
