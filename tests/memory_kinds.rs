//! One memory accounting: watch history, idempotency records and response
//! bodies in flight count beside the tables, in
//! `larder_memory_bytes{kind=…}`, against one `--max-memory-bytes`. A
//! table's history is freed after its last watcher leaves, without a write
//! to wake anything; idempotency records of memory tables are capped and
//! those of durable tables are not held in memory at all.

mod common;

use std::time::{Duration, Instant};

use common::sse::Stream;
use common::{spawn_with, TestApp};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn kind(app: &TestApp, kind: &str) -> f64 {
    app.metric(&format!("larder_memory_bytes{{kind=\"{kind}\"}}"))
        .await
}

/// Polls `kind`'s figure until `done` holds, for up to 30 s.
async fn until(app: &TestApp, which: &str, done: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = kind(app, which).await;
        if done(v) {
            return v;
        }
        assert!(Instant::now() < deadline, "{which} stuck at {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn watch_history_counts_and_is_freed_after_its_watchers_leave() {
    let app = spawn_with(|c| c.watch_history_retention_ms = 300).await;
    app.table("t", "set").await;
    let mut stream = Stream::open(&app.client, &app.url("/v1/tables/t/watch"), None).await;
    let pad = "w".repeat(10_000);
    for i in 0..100 {
        app.put("t", &format!("k{i}"), json!(pad)).await;
    }
    let events = stream.events(100).await;
    assert_eq!(events.len(), 100);
    let held = kind(&app, "watch").await;
    assert!(held > 100.0 * 10_000.0, "history counted: {held}");
    // The watcher leaves; no write follows, and the history still goes.
    drop(stream);
    until(&app, "watch", |v| v == 0.0).await;
    // A new watcher starts afresh: a resume from before gets reset.
    let mut again = Stream::open(&app.client, &app.url("/v1/tables/t/watch?since=1"), None).await;
    assert_eq!(again.event().await.unwrap().event, "reset");
}

#[tokio::test]
async fn every_kind_shares_the_one_limit() {
    let app = spawn_with(|c| {
        c.max_memory_bytes = 3 << 20;
        c.watch_history_retention_ms = 60_000;
    })
    .await;
    app.table("watched", "set").await;
    app.table("other", "set").await;
    let mut stream = Stream::open(&app.client, &app.url("/v1/tables/watched/watch"), None).await;
    // Each value is kept twice: in the table and in its history.
    let pad = "h".repeat(100_000);
    let mut stored = 0;
    for i in 0..40 {
        let r = app.put("watched", &format!("k{i}"), json!(pad)).await;
        if r.status != 201 {
            r.assert_error(507, "memory_limit");
            break;
        }
        stored += 1;
        app.delete("watched", &format!("k{i}")).await;
    }
    let _ = stream.events(1).await;
    // The table holds next to nothing, the history most of the limit:
    // another table's write is refused.
    assert!(stored > 5, "{stored}");
    let tables = kind(&app, "tables").await;
    let watch = kind(&app, "watch").await;
    assert!(tables < 1_000_000.0, "{tables}");
    assert!(watch > 2_000_000.0, "{watch}");
    app.put("other", "x", json!(pad))
        .await
        .assert_error(507, "memory_limit");
    assert_eq!(
        app.metric("larder_memory_limit_bytes").await,
        3.0 * 1048576.0
    );
}

#[tokio::test]
async fn idempotency_records_of_memory_tables_are_capped_and_durable_ones_stay_on_disk() {
    let app = spawn_with(|c| c.idempotency_max_bytes = 64 * 1024).await;
    app.table("m", "set").await;
    app.create_table(json!({"name": "d", "persistence": "sync"}))
        .await;
    for table in ["m", "d"] {
        for i in 0..400 {
            let r = app
                .send(
                    Method::PUT,
                    &format!("/v1/tables/{table}/entries/k{i}"),
                    Some(b"1".to_vec()),
                    &[("idempotency-key", &format!("key-{i}"))],
                )
                .await;
            assert_eq!(r.status, 201, "{}", r.text);
        }
    }
    // Beside the capped answers: the index of the durable table's records
    // (its own bound), 24 bytes each.
    let indexed = app.metric("larder_idempotency_index_entries").await;
    assert_eq!(indexed, 400.0);
    let held = kind(&app, "idempotency").await - indexed * 24.0;
    assert!(held <= 64.0 * 1024.0 + 1024.0, "capped: {held}");
    assert!(held > 32.0 * 1024.0, "kept up to the cap: {held}");
    let evicted = app.metric("larder_idempotency_evicted_total").await;
    assert!(evicted > 100.0, "{evicted}");
    // The durable table's first record is still replayed, from disk.
    let r = app
        .send(
            Method::PUT,
            "/v1/tables/d/entries/k0",
            Some(b"1".to_vec()),
            &[("idempotency-key", "key-0")],
        )
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    // The memory table's first record expired early: the retry applies
    // again (to the same effect), the newest is still replayed.
    let newest = app
        .send(
            Method::PUT,
            "/v1/tables/m/entries/k399",
            Some(b"1".to_vec()),
            &[("idempotency-key", "key-399")],
        )
        .await;
    assert_eq!(newest.header("idempotent-replayed"), Some("true"));
}

#[tokio::test]
async fn a_response_body_in_flight_is_counted_until_sent() {
    let app = spawn_with(|c| {
        c.max_body_bytes = 1 << 20;
        c.max_response_bytes = 64 << 20;
    })
    .await;
    app.table("t", "set").await;
    let pad = "r".repeat(1_000_000);
    for i in 0..30 {
        app.put("t", &format!("k{i}"), json!(pad)).await;
    }
    assert_eq!(kind(&app, "responses").await, 0.0);
    // A reader that takes nothing leaves most of a 30 MB page in flight
    // (more than the socket buffers hold).
    let mut slow = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    slow.write_all(b"GET /v1/tables/t/entries?limit=100 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let held = until(&app, "responses", |v| v > 29_000_000.0).await;
    assert!(held < 31_000_000.0, "{held}");
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    while got < 30_000_000 {
        let n = slow.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got += n;
    }
    drop(slow);
    until(&app, "responses", |v| v == 0.0).await;
}
