//! `Idempotency-Key` on writes: replays, refusals, a retry storm on a
//! counter, and records that outlive a SIGKILL on a `sync` table.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::ChildServer;
use common::recording::{change_flushed_before, flushed_before, record_with_change_flushed_before};
use common::{spawn_app, spawn_with, Reply, TestApp};
use reqwest::Method;
use serde_json::json;

async fn send_keyed(app: &TestApp, method: Method, path: &str, body: &str, key: &str) -> Reply {
    app.send(
        method,
        path,
        Some(body.as_bytes().to_vec()),
        &[("idempotency-key", key)],
    )
    .await
}

#[tokio::test]
async fn a_retry_gets_the_first_answer_and_applies_nothing() {
    let app = spawn_app().await;
    app.table("s", "set").await;
    let first = send_keyed(&app, Method::PUT, "/v1/tables/s/entries/a", "1", "put-a-1").await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert!(first.header("idempotent-replayed").is_none());
    let again = send_keyed(&app, Method::PUT, "/v1/tables/s/entries/a", "1", "put-a-1").await;
    assert_eq!(again.status, 201, "the original status");
    assert_eq!(again.text, first.text);
    assert_eq!(again.header("etag"), first.header("etag"));
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    // Nothing was applied again: the entry's version is the first one.
    assert_eq!(app.get("s", "a").await.header("etag"), first.header("etag"));
    assert_eq!(app.get_table("s").await.body["stats"]["inserts"], 1);
    // The same key with another body, path or method is 422.
    for (method, path, body) in [
        (Method::PUT, "/v1/tables/s/entries/a", "2"),
        (Method::PUT, "/v1/tables/s/entries/b", "1"),
        (Method::POST, "/v1/tables/s/entries/a/counter", "1"),
    ] {
        send_keyed(&app, method, path, body, "put-a-1")
            .await
            .assert_error(422, "idempotency_key_reused");
    }
    // Malformed keys are 400 and change nothing.
    let long = "k".repeat(129);
    for bad in ["", long.as_str(), "é"] {
        let r = app
            .client
            .put(app.entry_url("s", "c"))
            .header("idempotency-key", bad.as_bytes())
            .body("1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "key {bad:?}");
    }
    assert_eq!(app.get("s", "c").await.status, 404);
}

#[tokio::test]
async fn failures_are_not_remembered_and_reads_ignore_the_key() {
    let app = spawn_app().await;
    let r = send_keyed(&app, Method::PUT, "/v1/tables/t/entries/a", "1", "k1").await;
    r.assert_error(404, "table_not_found");
    app.table("t", "set").await;
    let r = send_keyed(&app, Method::PUT, "/v1/tables/t/entries/a", "1", "k1").await;
    assert_eq!(r.status, 201, "a failed request's retry runs afresh");
    assert!(r.header("idempotent-replayed").is_none());
    for (path, body) in [
        ("/v1/tables/t/select", "{}"),
        ("/v1/tables/t/select_count", "{}"),
        ("/v1/tables/t/lookup", r#"{"keys":["a"]}"#),
    ] {
        for _ in 0..2 {
            let r = send_keyed(&app, Method::POST, path, body, "k1").await;
            assert_eq!(r.status, 200, "{path}: {}", r.text);
            assert!(r.header("idempotent-replayed").is_none(), "{path}");
        }
    }
}

#[tokio::test]
async fn entries_named_like_routes_are_writes_like_any_other() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    for key in [
        "lookup",
        "select",
        "select_count",
        "import",
        "export",
        "watch",
    ] {
        let path = format!("/v1/tables/t/entries/{key}/counter");
        for attempt in 0..3 {
            let r = send_keyed(
                &app,
                Method::POST,
                &path,
                r#"{"default":0}"#,
                &format!("k-{key}"),
            )
            .await;
            assert_eq!(r.status, 200, "{path}: {}", r.text);
            assert_eq!(r.body["value"], 1, "{path}: applied once");
            assert_eq!(
                r.header("idempotent-replayed").is_some(),
                attempt > 0,
                "{path}"
            );
        }
        let put = format!("/v1/tables/t/entries/{key}");
        let first = send_keyed(&app, Method::PUT, &put, "7", &format!("p-{key}")).await;
        let again = send_keyed(&app, Method::PUT, &put, "7", &format!("p-{key}")).await;
        assert_eq!(again.header("idempotent-replayed"), Some("true"), "{put}");
        assert_eq!(again.header("etag"), first.header("etag"), "{put}");
    }
}

#[tokio::test]
async fn keys_are_scoped_to_the_principal_and_the_table() {
    let app = spawn_with(|c| c.tokens = Some("alice:token-alice-1,bob:token-bob-1".into())).await;
    for t in ["one", "two"] {
        let r = app
            .client
            .post(app.url("/v1/tables"))
            .bearer_auth("token-alice-1")
            .body(json!({"name": t, "access": "public"}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let incr = |t: &'static str, token: &'static str| {
        let app = &app;
        async move {
            let r = app
                .client
                .post(app.url(&format!("/v1/tables/{t}/entries/n/counter")))
                .bearer_auth(token)
                .header("idempotency-key", "same")
                .body(r#"{"default":0}"#)
                .send()
                .await
                .unwrap();
            let replayed = r.headers().contains_key("idempotent-replayed");
            let body: serde_json::Value = r.json().await.unwrap();
            (body["value"].as_i64().unwrap(), replayed)
        }
    };
    assert_eq!(incr("one", "token-alice-1").await, (1, false));
    assert_eq!(
        incr("one", "token-bob-1").await,
        (2, false),
        "another principal"
    );
    assert_eq!(
        incr("two", "token-alice-1").await,
        (1, false),
        "another table"
    );
    assert_eq!(incr("one", "token-alice-1").await, (1, true), "a replay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_storm_counts_each_increment_once() {
    let app = spawn_app().await;
    app.table("c", "set").await;
    let url = format!("{}/counter", app.entry_url("c", "hits"));
    let replays = Arc::new(AtomicU64::new(0));
    let in_flight = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    // 3,000 requests: increment i is sent three times, by three workers at
    // about the same moment, with the key "incr-i".
    for w in 0..24u64 {
        let (client, url) = (app.client.clone(), url.clone());
        let (replays, in_flight, next) = (replays.clone(), in_flight.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= 3000 {
                    return;
                }
                let key = format!("incr-{}", n / 3);
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let r = client
                        .post(&url)
                        .header("idempotency-key", &key)
                        .body(r#"{"incr":1,"default":0}"#)
                        .send()
                        .await
                        .unwrap();
                    match r.status().as_u16() {
                        200 => {
                            if r.headers().contains_key("idempotent-replayed") {
                                replays.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                        409 => {
                            in_flight.fetch_add(1, Ordering::Relaxed);
                            assert!(Instant::now() < deadline, "worker {w}: still in flight");
                            tokio::task::yield_now().await;
                        }
                        other => panic!("worker {w}: {other} {}", r.text().await.unwrap()),
                    }
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(app.get("c", "hits").await.body["value"], 1000);
    assert_eq!(replays.load(Ordering::Relaxed), 2000);
}

#[tokio::test]
async fn a_sync_tables_records_survive_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path()).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/tables", server.base))
        .body(r#"{"name":"c","persistence":"sync"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut answers = Vec::new();
    for i in 0..20 {
        let r = keyed_increment(&client, &server, i).await;
        assert!(r.1.is_none(), "a first request");
        answers.push(r.0);
    }
    server.kill9();
    let server = ChildServer::start(dir.path()).await;
    for (i, answer) in answers.iter().enumerate() {
        let (body, replayed) = keyed_increment(&client, &server, i).await;
        assert_eq!(
            replayed.as_deref(),
            Some("true"),
            "retry {i} after the restart"
        );
        assert_eq!(&body, answer);
    }
    let r: serde_json::Value = client
        .get(server.entry_url("c", "n"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["value"], 20, "no retry was applied again");
}

/// Increments counter `n` of table `c` with the key `k{i}`: the answer's
/// body and its `Idempotent-Replayed` header.
async fn keyed_increment(
    client: &reqwest::Client,
    server: &ChildServer,
    i: usize,
) -> (String, Option<String>) {
    let r = client
        .post(format!("{}/counter", server.entry_url("c", "n")))
        .header("idempotency-key", format!("k{i}"))
        .body(r#"{"default":0}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let replayed = r
        .headers()
        .get("idempotent-replayed")
        .map(|v| v.to_str().unwrap().to_owned());
    (r.text().await.unwrap(), replayed)
}

/// Flushes counted through the engine: a keyed write on a `sync` table
/// costs one round for the change and its record together, and a
/// select_delete one round for all its deletes. A kill -9 cannot tell a
/// write from an fsync, so the engine's log shows that each answer came
/// after a flush that began once its change had reached the engine.
#[tokio::test]
async fn keyed_sync_writes_and_select_deletes_cost_one_flush() {
    let recorder = Arc::new(common::recording::Recorder::default());
    let app = common::spawn_with_engine(recorder.wrapper()).await;
    let r = app
        .create_table(json!({"name": "s", "persistence": "sync"}))
        .await;
    assert_eq!(r.status, 201);
    for i in 0..5 {
        let before = recorder.flushes();
        let r = send_keyed(
            &app,
            Method::POST,
            "/v1/tables/s/entries/n/counter",
            r#"{"default":0}"#,
            &format!("f{i}"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(recorder.flushes() - before, 1, "keyed write {i}");
        let answered = recorder.mark();
        let events = recorder.events();
        assert!(
            flushed_before(&events, "s", "n", &json!(i + 1), answered).is_some(),
            "keyed write {i} was answered before its change was flushed"
        );
        assert!(
            record_with_change_flushed_before(&events, "s", "n", answered).is_some(),
            "keyed write {i} was answered before its record was flushed in the batch of its change"
        );
    }
    for i in 0..10 {
        assert_eq!(app.put("s", &format!("k{i}"), json!(i)).await.status, 201);
    }
    let before = recorder.flushes();
    let r = app
        .send(
            Method::POST,
            "/v1/tables/s/select_delete",
            Some(br#"{"match":{"key":"$k","value":"$v"},"where":["is_integer","$v"]}"#.to_vec()),
            &[],
        )
        .await;
    assert_eq!(r.body["deleted"], 11, "{}", r.text);
    assert_eq!(recorder.flushes() - before, 1, "one flush for the deletes");
    let answered = recorder.mark();
    let events = recorder.events();
    for key in (0..10).map(|i| format!("k{i}")).chain(["n".to_owned()]) {
        assert!(
            change_flushed_before(&events, "s", &key, None, answered).is_some(),
            "the delete of {key} was answered before it was flushed"
        );
    }
}

/// Keyed increments of counter `c/n` with keys `k0..kn`: `replayed`
/// says whether each must be a replay; the i-th answers `i + 1` either way.
async fn keyed_increments(app: &TestApp, n: u64, replayed: bool) {
    for i in 0..n {
        let r = send_keyed(
            app,
            Method::POST,
            "/v1/tables/c/entries/n/counter",
            r#"{"default":0}"#,
            &format!("k{i}"),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let expected = replayed.then_some("true");
        assert_eq!(r.header("idempotent-replayed"), expected, "k{i}");
        assert_eq!(r.body["value"], json!(i + 1));
    }
}

/// Sends `n` fresh keyed increments, then retries each.
async fn fresh_keys_then_retries(app: &TestApp, n: u64) {
    keyed_increments(app, n, false).await;
    keyed_increments(app, n, true).await;
}

#[tokio::test]
async fn fresh_keys_skip_the_disk_and_stored_ones_are_found_after_a_restart() {
    let app = spawn_app().await;
    let r = app
        .create_table(json!({"name": "c", "persistence": "periodic", "auto_save_ms": 50}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    fresh_keys_then_retries(&app, 200).await;
    // Each fresh key was known to be new without a lookup; each retry was
    // looked up (queued or on disk) and found.
    assert!(app.metric("larder_idempotency_filter_skipped_total").await >= 200.0);
    assert_eq!(
        app.metric("larder_idempotency_filter_false_positives_total")
            .await,
        0.0
    );
    assert_eq!(app.metric("larder_idempotency_filter_records").await, 200.0);
    assert_eq!(
        app.metric("larder_idempotency_filter_bytes").await,
        (8u64 << 20) as f64
    );

    // Each record went into a bundle, found through the index.
    assert_eq!(app.metric("larder_idempotency_index_entries").await, 200.0);

    // After a restart the filter and the index are rebuilt from disk
    // before any request.
    let app = common::spawn_on(app.stop().await).await;
    assert_eq!(app.metric("larder_idempotency_filter_records").await, 200.0);
    assert_eq!(app.metric("larder_idempotency_index_entries").await, 200.0);
    keyed_increments(&app, 200, true).await;
    assert_eq!(app.get("c", "n").await.body["value"], 200);
}

#[tokio::test]
async fn records_past_the_index_bound_are_stored_alone_and_never_missed() {
    let app = spawn_with(|c| c.idempotency_index_entries = 5).await;
    let r = app
        .create_table(json!({"name": "c", "persistence": "sync"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    fresh_keys_then_retries(&app, 40).await;
    assert_eq!(app.metric("larder_idempotency_index_entries").await, 5.0);
    assert_eq!(
        app.metric("larder_idempotency_index_max_entries").await,
        5.0
    );

    // Restarted with a lower bound: the bundled records the index cannot
    // take any more are stored alone at start.
    let dir = app.stop().await;
    let app = common::spawn_on_with(dir, |c| c.idempotency_index_entries = 2).await;
    assert_eq!(app.metric("larder_idempotency_index_entries").await, 2.0);
    keyed_increments(&app, 40, true).await;
    assert_eq!(app.get("c", "n").await.body["value"], 40);

    // And with room again, every record is still found.
    let app = common::spawn_on(app.stop().await).await;
    keyed_increments(&app, 40, true).await;
    let path = "/v1/tables/c/entries/n/counter";
    let fresh = send_keyed(&app, Method::POST, path, r#"{"default":0}"#, "k40").await;
    assert_eq!(fresh.body["value"], 41);
}

#[tokio::test]
async fn a_saturated_filter_sends_lookups_to_disk_and_misses_nothing() {
    // 64 bits: full after a few dozen records.
    let app = spawn_with(|c| c.idempotency_filter_bytes = 8).await;
    let r = app
        .create_table(json!({"name": "c", "persistence": "sync"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    fresh_keys_then_retries(&app, 300).await;
    assert_eq!(app.metric("larder_idempotency_filter_bytes").await, 8.0);
    assert!(
        app.metric("larder_idempotency_filter_false_positives_total")
            .await
            > 100.0,
        "most fresh keys went to disk"
    );
    assert_eq!(app.get("c", "n").await.body["value"], 300);
}

#[tokio::test]
async fn the_purge_forgets_expired_answers_and_rebuilds_the_filter_from_the_rest() {
    let app = common::spawn_with_manual_clock_and(|c| {
        c.idempotency_ttl_secs = 10;
        c.idempotency_purge_ms = 20;
    })
    .await;
    let r = app
        .create_table(json!({"name": "c", "persistence": "sync"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let path = "/v1/tables/c/entries/n/counter";
    let incr = |key: &'static str| send_keyed(&app, Method::POST, path, r#"{"default":0}"#, key);
    for key in ["old-1", "old-2", "old-3"] {
        assert_eq!(incr(key).await.status, 200);
    }
    app.advance(6_000);
    assert_eq!(incr("new").await.body["value"], 4);
    // The three old answers expire; the new one does not.
    app.advance(5_000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while app.metric("larder_idempotency_filter_records").await != 1.0 {
        assert!(Instant::now() < deadline, "the filter was not rebuilt");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Their bundles left the disk and the index with them.
    assert_eq!(app.metric("larder_idempotency_index_entries").await, 1.0);
    let again = incr("new").await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.body["value"], 4);
    // An expired key is a new request.
    let fresh = incr("old-1").await;
    assert_eq!(fresh.header("idempotent-replayed"), None);
    assert_eq!(fresh.body["value"], 5);
}
