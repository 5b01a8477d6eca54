//! TTLs: never returned once expired, by any operation; swept without a
//! request touching them; counted exactly. Time is moved by hand except in
//! one end-to-end test.

mod common;

use std::time::{Duration, Instant};

use common::{spawn_app, spawn_with_manual_clock};
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn an_expired_entry_is_gone_for_every_operation() {
    let app = spawn_with_manual_clock().await;
    app.table("t", "set").await;
    app.table("o", "ordered_set").await;
    let etag = app
        .put_with("t", "k", json!({"n": 1}), "?ttl_ms=1000", &[])
        .await
        .header("etag")
        .unwrap()
        .to_owned();
    app.put_with("o", "k", json!(1), "?ttl_ms=1000", &[]).await;
    app.advance(999);
    assert_eq!(app.get("t", "k").await.body["ttl_ms"], 1);
    app.advance(1);
    app.get("t", "k").await.assert_error(404, "key_not_found");
    assert_eq!(
        app.send(Method::HEAD, "/v1/tables/t/entries/k", None, &[])
            .await
            .status,
        404
    );
    assert!(app.scan_all("t", "").await.is_empty());
    assert!(app.scan_all("o", "").await.is_empty());
    assert!(app.scan_all("o", "?reverse=true").await.is_empty());
    app.put_with("t", "k", json!(2), "", &[("if-match", &etag)])
        .await
        .assert_error(412, "precondition_failed");
    app.send(
        Method::PATCH,
        "/v1/tables/t/entries/k",
        Some(b"{}".to_vec()),
        &[],
    )
    .await
    .assert_error(404, "key_not_found");
    app.send(Method::POST, "/v1/tables/t/entries/k/take", None, &[])
        .await
        .assert_error(404, "key_not_found");
    // A counter on an expired key behaves as on a missing one.
    app.counter("t", "k", json!({}))
        .await
        .assert_error(404, "key_not_found");
    let r = app.counter("t", "k", json!({"default": 10})).await;
    assert_eq!(r.body["value"], 11);
    // insert_new succeeds where the key has expired.
    app.put_with("o", "k", json!(3), "", &[("if-none-match", "*")])
        .await;
    assert_eq!(app.get("o", "k").await.body["value"], 3);
}

#[tokio::test]
async fn stats_count_exactly_the_entries_that_expired() {
    let app = spawn_with_manual_clock().await;
    app.table("b", "bag").await;
    for i in 0..50 {
        app.put_with("b", &format!("k{i}"), json!(i), "?ttl_ms=500", &[])
            .await;
        app.put_with("b", &format!("k{i}"), json!("again"), "?ttl_ms=500", &[])
            .await;
    }
    for i in 0..10 {
        app.put("b", &format!("keep{i}"), json!(i)).await;
    }
    // One expired key is overwritten before the sweeper sees it: it still
    // expired, and counts once.
    app.advance(500);
    app.put("b", "k0", json!("fresh")).await;
    assert_eq!(app.get_table("b").await.body["stats"]["expired"], 1);
    let swept = app.store.purge_expired(usize::MAX);
    assert_eq!(swept, 49);
    assert_eq!(
        app.store.purge_expired(usize::MAX),
        0,
        "nothing is counted twice"
    );
    let info = app.get_table("b").await.body;
    assert_eq!(info["stats"]["expired"], 50);
    assert_eq!(info["size"], 11);
    assert_eq!(app.get("b", "k0").await.body["values"], json!(["fresh"]));
}

#[tokio::test]
async fn the_sweeper_works_in_bounded_steps() {
    let app = spawn_with_manual_clock().await;
    app.table("t", "set").await;
    let items: Vec<_> = (0..2500)
        .map(|i| json!({"key": format!("k{i}"), "value": i, "ttl_ms": 100}))
        .collect();
    app.send(
        Method::POST,
        "/v1/tables/t/entries",
        Some(json!(items).to_string().into_bytes()),
        &[],
    )
    .await;
    app.advance(100);
    assert_eq!(app.store.purge_expired(1000), 1000);
    assert_eq!(app.store.purge_expired(1000), 1000);
    assert_eq!(app.store.purge_expired(1000), 500);
    let info = app.get_table("t").await.body;
    assert_eq!(info["size"], 0);
    assert_eq!(info["stats"]["expired"], 2500);
    assert_eq!(app.store.table("t").unwrap().tracked_bytes(), 0);
}

#[tokio::test]
async fn writes_restart_the_default_ttl_and_explicit_ttls_win() {
    let app = spawn_with_manual_clock().await;
    app.create_table(json!({"name": "d", "default_ttl_ms": 1000}))
        .await;
    app.put("d", "a", json!(1)).await;
    app.put_with("d", "b", json!(1), "?ttl_ms=5000", &[]).await;
    app.advance(600);
    app.put("d", "a", json!(2)).await; // restarts a's TTL
    app.counter("d", "b", json!({})).await; // the table default restarts it too
    app.advance(600);
    assert_eq!(app.get("d", "a").await.body["value"], 2);
    assert_eq!(app.get("d", "b").await.body["ttl_ms"], 400);
    app.advance(400);
    app.get("d", "a").await;
    app.get("d", "b").await.assert_error(404, "key_not_found");
}

#[tokio::test]
async fn the_background_sweeper_frees_entries_nobody_reads() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    // A long-lived key first, so the sweeper sleeps towards a far deadline
    // and must be woken by the short one.
    app.put_with("t", "later", json!(1), "?ttl_ms=3600000", &[])
        .await;
    app.put_with("t", "soon", json!(1), "?ttl_ms=50", &[]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = app.get_table("t").await.body;
        if info["stats"]["expired"] == 1 {
            assert_eq!(info["size"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "not swept: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
