//! `/metrics` parsed by a real Prometheus text parser.

mod common;

use common::spawn_app;
use prometheus_parse::{Scrape, Value};
use reqwest::Method;
use serde_json::json;

async fn scrape(app: &common::TestApp) -> Scrape {
    let r = app.client.get(app.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = r.text().await.unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("valid exposition format")
}

fn value(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == metric && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
}

#[tokio::test]
async fn metrics_report_requests_tables_and_write_back() {
    let app = spawn_app().await;
    app.create_table(json!({"name": "t", "max_entries": 3, "eviction": "lru"}))
        .await;
    app.create_table(json!({"name": "p", "persistence": "sync"}))
        .await;
    for i in 0..5 {
        assert_eq!(app.put("t", &format!("k{i}"), json!(i)).await.status, 201);
    }
    app.get("t", "k4").await;
    app.get("t", "k4").await;
    app.get("t", "nope").await;
    app.put("p", "a", json!(1)).await;
    app.table("e", "set").await;
    app.put_with("e", "short", json!(1), "?ttl_ms=1", &[]).await;
    let s = scrape(&app).await;

    let route = "/v1/tables/:table/entries/:key";
    assert_eq!(
        value(
            &s,
            "larder_http_requests_total",
            &[("route", route), ("method", "PUT"), ("status", "201")]
        ),
        Some(7.0)
    );
    assert_eq!(
        value(
            &s,
            "larder_http_requests_total",
            &[("route", route), ("method", "GET"), ("status", "404")]
        ),
        Some(1.0)
    );
    let hist = s
        .samples
        .iter()
        .find(|x| {
            x.metric == "larder_http_request_duration_seconds"
                && x.labels.get("method") == Some("PUT")
        })
        .expect("latency histogram");
    assert!(
        matches!(&hist.value, Value::Histogram(b) if b.len() > 5),
        "buckets, not a summary"
    );

    assert_eq!(
        value(&s, "larder_table_objects", &[("table", "t")]),
        Some(3.0)
    );
    assert!(value(&s, "larder_table_memory_bytes", &[("table", "t")]).unwrap() > 0.0);
    assert_eq!(
        value(&s, "larder_table_hits_total", &[("table", "t")]),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "larder_table_misses_total", &[("table", "t")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "larder_table_evicted_total", &[("table", "t")]),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "larder_table_inserts_total", &[("table", "t")]),
        Some(5.0)
    );
    assert_eq!(
        value(&s, "larder_table_dirty_objects", &[("table", "p")]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "larder_table_dirty_objects", &[("table", "t")]),
        None,
        "memory tables have no dirty count"
    );
    assert!(value(&s, "larder_writeback_rounds_total", &[]).unwrap() >= 1.0);
    assert_eq!(value(&s, "larder_sync_writes_total", &[]), Some(1.0));
    assert!(value(&s, "larder_writeback_round_duration_seconds", &[]).unwrap() >= 1.0);
    assert!(value(&s, "larder_memory_bytes", &[("kind", "tables")]).unwrap() > 0.0);
    assert_eq!(
        value(&s, "larder_memory_bytes", &[("kind", "watch")]),
        Some(0.0)
    );
    assert_eq!(value(&s, "larder_tables", &[]), Some(3.0));

    // Expirations are counted once swept.
    app.store.purge_expired(usize::MAX);
    let s = scrape(&app).await;
    assert_eq!(
        value(&s, "larder_table_expired_total", &[("table", "e")]),
        Some(1.0)
    );
    let _ = app.send(Method::GET, "/healthz", None, &[]).await;
}

/// Freed heap memory is given back to the OS once a burst of writes is
/// saved and a sync asks for it, but not for a handful of writes.
#[tokio::test]
async fn freed_memory_is_given_back_after_a_burst_of_writes_not_after_a_few() {
    let app = spawn_app().await;
    app.create_table(json!({"name": "p", "persistence": "sync"}))
        .await;
    let sync = || async {
        let r = app.send(Method::POST, "/v1/tables/p/sync", None, &[]).await;
        assert_eq!(r.status, 200, "{}", r.text);
    };
    // Rounds run one after another on one thread, and a round decides on
    // its trim before the next begins: once a second sync is answered, the
    // first sync's round has decided.
    for i in 0..10 {
        app.put("p", &format!("few{i}"), json!(i)).await;
    }
    sync().await;
    sync().await;
    assert_eq!(app.metric("larder_memory_trims_total").await, 0.0);

    // 5000 keys in two requests: no round writes enough keys to shrink a
    // dirty set (which gives memory back on its own).
    for half in 0..2 {
        let burst: Vec<(String, serde_json::Value)> = (0..2500)
            .map(|i| (format!("k{half}-{i:04}"), json!(i)))
            .collect();
        app.bulk("p", &burst).await;
    }
    sync().await;
    sync().await;
    assert_eq!(app.metric("larder_memory_trims_total").await, 1.0);
}

/// A burst of writes to a memory-only table, once the writes stop, also
/// gives freed memory back (the write-back thread looks about once a
/// second).
#[tokio::test]
async fn freed_memory_is_given_back_once_writes_to_memory_tables_stop() {
    let app = spawn_app().await;
    app.create_table(json!({"name": "m"})).await;
    let burst: Vec<(String, serde_json::Value)> =
        (0..5000).map(|i| (format!("k{i:05}"), json!(i))).collect();
    app.bulk("m", &burst).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if app.metric("larder_memory_trims_total").await >= 1.0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no trim 30 s after the writes stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_process_its_build_and_its_fsyncs_are_reported() {
    let app = spawn_app().await;
    assert_eq!(
        app.create_table(json!({"name": "d", "persistence": "sync"}))
            .await
            .status,
        201
    );
    for i in 0..5 {
        assert!(app
            .put("d", &format!("k{i}"), json!(i))
            .await
            .status
            .is_success());
    }
    let s = scrape(&app).await;
    let v = |name: &str| value(&s, name, &[]).unwrap_or_else(|| panic!("{name} missing"));
    // The test process is the server's: its figures must be sane.
    assert!(v("process_resident_memory_bytes") > 1e6);
    assert!(v("process_virtual_memory_bytes") >= v("process_resident_memory_bytes"));
    assert!(v("process_open_fds") >= 3.0);
    assert!(v("process_max_fds") >= v("process_open_fds"));
    assert!(v("process_cpu_seconds_total") > 0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let started = v("process_start_time_seconds");
    assert!(started <= now && started > now - 3600.0, "{started}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(&s, "larder_build_info", &[("version", version)]),
        Some(1.0)
    );
    // Five sync writes: at least one fsync, each in the histogram.
    assert!(v("larder_fsync_duration_seconds") >= 1.0);
}
