//! Transactions (`POST /v1/tables/{t}/txn`) over HTTP: answers, refusals,
//! aborts that change nothing, idempotent retries, watchers that get a
//! transaction's changes together, and concurrent transfers between two
//! counters whose sum never changes.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::sse::Stream;
use common::{enc, spawn_app, Reply, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

async fn txn(app: &TestApp, table: &str, body: Value) -> Reply {
    txn_with(app, table, body, &[]).await
}

async fn txn_with(app: &TestApp, table: &str, body: Value, headers: &[(&str, &str)]) -> Reply {
    app.send(
        Method::POST,
        &format!("/v1/tables/{}/txn", enc(table)),
        Some(body.to_string().into_bytes()),
        headers,
    )
    .await
}

fn etag(r: &Reply) -> u64 {
    r.header("etag")
        .expect("an ETag")
        .trim_matches('"')
        .parse()
        .expect("a numeric ETag")
}

#[tokio::test]
async fn a_transaction_answers_one_result_per_operation() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    let a = app.put("t", "a", json!(100)).await;
    let rev = etag(&a);
    let r = txn(
        &app,
        "t",
        json!({
            "if": [{"key": "a", "revision": rev}, {"key": "b", "exists": false},
                   {"key": "a", "value": 100}],
            "then": [
                {"op": "put", "key": "b", "value": {"x": 1}, "ttl_ms": 60000},
                {"op": "counter", "key": "a", "incr": -30},
                {"op": "counter", "key": "n", "incr": 1, "default": 0},
                {"op": "patch", "key": "b", "value": {"y": 2}},
                {"op": "get", "key": "b"},
                {"op": "get", "key": "missing"},
                {"op": "delete", "key": "missing"},
                {"op": "take", "key": "n"},
                {"op": "insert_new", "key": "c", "value": "new"},
                {"op": "delete_object", "key": "c", "value": "new"}
            ],
            "else": [{"op": "get", "key": "a"}]
        }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["succeeded"], true);
    let res = r.body["results"].as_array().expect("results");
    assert_eq!(res.len(), 10);
    assert_eq!(res[0]["key"], "b");
    assert_eq!(res[0]["value"], json!({"x": 1}));
    assert!(res[0]["ttl_ms"].as_u64().is_some_and(|t| t <= 60000));
    assert_eq!(
        res[1],
        json!({"key": "a", "value": 70, "revision": res[1]["revision"]})
    );
    assert_eq!(res[2]["value"], 1);
    assert_eq!(res[3]["value"], json!({"x": 1, "y": 2}));
    assert_eq!(res[4]["value"], json!({"x": 1, "y": 2}));
    assert_eq!(res[4]["revision"], res[3]["revision"]);
    assert_eq!(res[5], Value::Null);
    assert_eq!(res[6], json!({"deleted": false}));
    assert_eq!(res[7]["value"], 1);
    assert_eq!(res[8]["value"], "new");
    assert_eq!(res[9], json!({"deleted": true}));
    // Each change its own revision, increasing in op order.
    let revs: Vec<u64> = [0, 1, 2, 3, 8]
        .iter()
        .map(|&i| res[i]["revision"].as_u64().expect("revision"))
        .collect();
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "{revs:?}");
    // What GET sees agrees, ETags included.
    let b = app.get("t", "b").await;
    assert_eq!(b.body["value"], json!({"x": 1, "y": 2}));
    assert_eq!(etag(&b), revs[3]);
    assert_eq!(app.get("t", "a").await.body["value"], 70);
    assert_eq!(app.get("t", "n").await.status, 404);
    assert_eq!(app.get("t", "c").await.status, 404);

    // A comparison that fails runs `else`.
    let r = txn(
        &app,
        "t",
        json!({"if": [{"key": "a", "revision": rev}],
               "then": [{"op": "delete", "key": "a"}],
               "else": [{"op": "get", "key": "a"}]}),
    )
    .await;
    assert_eq!(r.body["succeeded"], false, "{}", r.text);
    assert_eq!(r.body["results"][0]["value"], 70);
    assert_eq!(app.get("t", "a").await.status, 200);
}

#[tokio::test]
async fn a_failing_operation_aborts_everything() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    let a = app.put("t", "a", json!(1)).await;
    app.put("t", "s", json!("text")).await;
    app.put("t", "other", json!([1, 2])).await;
    let cases = [
        (json!({"op": "counter", "key": "s"}), "not_a_counter"),
        (json!({"op": "counter", "key": "absent"}), "key_not_found"),
        (
            json!({"op": "patch", "key": "absent", "value": {}}),
            "key_not_found",
        ),
        (
            json!({"op": "patch", "key": "s", "value": {"a": 1}}),
            "not_an_object",
        ),
        (
            json!({"op": "insert_new", "key": "a", "value": 2}),
            "precondition_failed",
        ),
        (
            json!({"op": "counter", "key": "a", "incr": i64::MAX}),
            "overflow",
        ),
    ];
    for (failing, cause) in cases {
        let r = txn(
            &app,
            "t",
            json!({"then": [
                {"op": "put", "key": "a", "value": 99},
                {"op": "delete", "key": "other"},
                {"op": "put", "key": "fresh", "value": 1},
                failing,
            ]}),
        )
        .await;
        r.assert_error(409, "txn_aborted");
        assert_eq!(r.body["error"]["op"], 3, "{}", r.text);
        assert_eq!(r.body["error"]["cause"], cause, "{}", r.text);
        // Nothing applied: values and ETags as they were.
        let now = app.get("t", "a").await;
        assert_eq!(now.body["value"], 1);
        assert_eq!(etag(&now), etag(&a), "the ETag did not move");
        assert_eq!(app.get("t", "s").await.body["value"], "text");
        assert_eq!(app.get("t", "other").await.body["value"], json!([1, 2]));
        assert_eq!(app.get("t", "fresh").await.status, 404);
    }
    let info = app.get_table("t").await;
    assert_eq!(info.body["size"], 3, "{}", info.text);

    // On a bag table a counter is the wrong type.
    app.table("b", "bag").await;
    let r = txn(
        &app,
        "b",
        json!({"then": [{"op": "put", "key": "k", "value": 1},
                        {"op": "counter", "key": "k"}]}),
    )
    .await;
    r.assert_error(409, "txn_aborted");
    assert_eq!(r.body["error"]["cause"], "wrong_table_type");
    assert_eq!(app.get("b", "k").await.status, 404);
}

#[tokio::test]
async fn malformed_transactions_are_refused_naming_the_part() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    app.table("b", "bag").await;
    let ops = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"op": "get", "key": format!("k{i}")}))
            .collect()
    };
    let cmps = |n: usize| -> Vec<Value> {
        (0..n)
            .map(|i| json!({"key": format!("k{i}"), "exists": true}))
            .collect()
    };
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("t", json!([1]), "invalid_argument", "object"),
        // A list may be left out, never given as null: the published schema
        // says each is an array.
        (
            "t",
            json!({"then": null}),
            "invalid_argument",
            "must be an array",
        ),
        (
            "t",
            json!({"then": ops(129)}),
            "invalid_argument",
            "at most 128",
        ),
        (
            "t",
            json!({"else": ops(129)}),
            "invalid_argument",
            "at most 128",
        ),
        (
            "t",
            json!({"if": cmps(129)}),
            "invalid_argument",
            "at most 128",
        ),
        (
            "t",
            json!({"then": [{"op": "get", "key": "a"}, {"op": "frob", "key": "a"}]}),
            "invalid_argument",
            "then[1]",
        ),
        (
            "t",
            json!({"else": [{"op": "put", "key": "a"}]}),
            "invalid_argument",
            "else[0]",
        ),
        (
            "t",
            json!({"then": [{"op": "get", "key": "a", "value": 1}]}),
            "invalid_argument",
            "then[0]",
        ),
        (
            "t",
            json!({"then": [{"op": "put", "key": "", "value": 1}]}),
            "invalid_key",
            "then[0]",
        ),
        (
            "t",
            json!({"then": [{"op": "put", "key": "a", "value": 1, "ttl_ms": 0}]}),
            "invalid_argument",
            "then[0]",
        ),
        (
            "t",
            json!({"then": [{"op": "patch", "key": "a", "value": 1}]}),
            "invalid_argument",
            "then[0]",
        ),
        (
            "t",
            json!({"then": [{"op": "counter", "key": "a", "incr": "x"}]}),
            "invalid_argument",
            "then[0]",
        ),
        (
            "t",
            json!({"if": [{"key": "a"}]}),
            "invalid_argument",
            "if[0]",
        ),
        (
            "t",
            json!({"if": [{"key": "a", "exists": true, "revision": 1}]}),
            "invalid_argument",
            "if[0]",
        ),
        (
            "t",
            json!({"if": [{"key": "a", "revision": -1}]}),
            "invalid_argument",
            "if[0]",
        ),
        (
            "t",
            json!({"if": [], "otherwise": []}),
            "invalid_argument",
            "otherwise",
        ),
        (
            "b",
            json!({"if": [{"key": "a", "exists": true}, {"key": "a", "value": 1}]}),
            "invalid_argument",
            "if[1]",
        ),
    ];
    for (table, body, code, names) in cases {
        let r = txn(&app, table, body.clone()).await;
        r.assert_error(400, code);
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(names), "{body}: {message}");
    }
    let r = app
        .send(Method::POST, "/v1/tables/t/txn", Some(b"{".to_vec()), &[])
        .await;
    r.assert_error(400, "invalid_json");
    let r = txn(&app, "nope", json!({})).await;
    r.assert_error(404, "table_not_found");
    let info = app.get_table("t").await;
    assert_eq!(info.body["size"], 0);
}

#[tokio::test]
async fn a_keyed_transaction_is_applied_once_and_replayed() {
    let app = spawn_app().await;
    app.create_table(json!({"name": "t", "type": "set", "persistence": "sync"}))
        .await;
    let body = json!({"then": [{"op": "counter", "key": "a", "default": 0},
                               {"op": "counter", "key": "b", "default": 0}]});
    let first = txn_with(&app, "t", body.clone(), &[("Idempotency-Key", "move-1")]).await;
    assert_eq!(first.status, 200, "{}", first.text);
    let again = txn_with(&app, "t", body.clone(), &[("Idempotency-Key", "move-1")]).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.text, first.text);
    assert_eq!(app.get("t", "a").await.body["value"], 1);
    assert_eq!(app.get("t", "b").await.body["value"], 1);
    // An aborted one is not remembered: its retry runs afresh.
    let failing = json!({"then": [{"op": "counter", "key": "c"}]});
    let r = txn_with(&app, "t", failing.clone(), &[("Idempotency-Key", "k2")]).await;
    r.assert_error(409, "txn_aborted");
    app.put("t", "c", json!(5)).await;
    let r = txn_with(&app, "t", failing, &[("Idempotency-Key", "k2")]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["results"][0]["value"], 6);
}

#[tokio::test]
async fn watchers_get_a_transactions_changes_together() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    let url = app.url("/v1/tables/t/watch");
    let mut stream = Stream::open(&app.client, &url, None).await;
    // A writer of another key keeps changing the table meanwhile.
    let noise = {
        let app_client = app.client.clone();
        let url = app.entry_url("t", "noise");
        tokio::spawn(async move {
            for i in 0..300 {
                let r = app_client
                    .put(&url)
                    .body(i.to_string())
                    .send()
                    .await
                    .expect("put");
                assert!(r.status().is_success());
            }
        })
    };
    const TXNS: usize = 40;
    for i in 0..TXNS {
        let r = txn(
            &app,
            "t",
            json!({"then": [{"op": "put", "key": "x", "value": i},
                            {"op": "put", "key": "y", "value": i},
                            {"op": "delete", "key": "z"},
                            {"op": "put", "key": "z", "value": i}]}),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    noise.await.expect("noise writer");
    let mut events = Vec::new();
    while events
        .iter()
        .filter(|e: &&common::sse::Event| e.key() == "z")
        .count()
        < 2 * TXNS - 1
    {
        events.push(stream.event().await.expect("an event"));
    }
    let mut seen = 0;
    for (i, e) in events.iter().enumerate() {
        if e.key() != "x" {
            continue;
        }
        // x, y, then z's delete (after the first round) and put: adjacent.
        let rest: Vec<&str> = events[i..]
            .iter()
            .take(if seen == 0 { 3 } else { 4 })
            .map(|e| e.key())
            .collect();
        let want: &[&str] = if seen == 0 {
            &["x", "y", "z"]
        } else {
            &["x", "y", "z", "z"]
        };
        assert_eq!(rest, want, "a transaction's events came apart: {events:?}");
        seen += 1;
    }
    assert_eq!(seen, TXNS);
    let revisions: Vec<u64> = events.iter().map(|e| e.revision()).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]));
}

/// Transfers between two counters by compare-on-revision transactions
/// from 16 clients, while readers read both in one transaction: every
/// read sums to the start, and the counters end exactly at the
/// transfers that succeeded.
async fn transfers_keep_the_sum(app: &Arc<TestApp>, table: &str) {
    let total = 1000i64;
    let r = txn(
        app,
        table,
        json!({"then": [{"op": "put", "key": "a", "value": total},
                        {"op": "put", "key": "b", "value": 0}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let moved = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..16 {
        let app = app.clone();
        let moved = moved.clone();
        let table = table.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut reads = 0;
            for _ in 0..25 {
                let read = txn(
                    &app,
                    &table,
                    json!({"then": [{"op": "get", "key": "a"}, {"op": "get", "key": "b"}]}),
                )
                .await;
                assert_eq!(read.status, 200, "{}", read.text);
                let (a, b) = (&read.body["results"][0], &read.body["results"][1]);
                let sum = a["value"].as_i64().unwrap() + b["value"].as_i64().unwrap();
                assert_eq!(sum, total, "a reader saw half a transfer: {}", read.text);
                reads += 1;
                if c % 4 == 3 {
                    continue; // a reader only
                }
                let moved_now = txn(
                    &app,
                    &table,
                    json!({"if": [{"key": "a", "revision": a["revision"]},
                                  {"key": "b", "revision": b["revision"]}],
                           "then": [{"op": "counter", "key": "a", "incr": -1},
                                    {"op": "counter", "key": "b", "incr": 1}]}),
                )
                .await;
                assert_eq!(moved_now.status, 200, "{}", moved_now.text);
                if moved_now.body["succeeded"] == true {
                    moved.fetch_add(1, Ordering::Relaxed);
                }
            }
            reads
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("client"), 25);
    }
    let moved = moved.load(Ordering::Relaxed) as i64;
    assert!(moved > 0, "no transfer won its comparison");
    assert_eq!(app.get(table, "a").await.body["value"], total - moved);
    assert_eq!(app.get(table, "b").await.body["value"], moved);
}

#[tokio::test]
async fn concurrent_transfers_keep_the_sum_on_every_local_persistence() {
    let app = Arc::new(spawn_app().await);
    for p in ["none", "periodic", "sync"] {
        let name = format!("acct_{p}");
        let r = app
            .create_table(json!({"name": name, "type": "set", "persistence": p}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        transfers_keep_the_sum(&app, &name).await;
    }
}

#[tokio::test]
async fn results_past_the_answer_limit_apply_nothing() {
    let app = common::spawn_with(|c| c.max_response_bytes = 64 * 1024).await;
    app.table("t", "set").await;
    let big = "x".repeat(40 * 1024);
    app.put("t", "big", json!(big)).await;
    let r = txn(
        &app,
        "t",
        json!({"then": [{"op": "put", "key": "marker", "value": 1},
                        {"op": "get", "key": "big"},
                        {"op": "get", "key": "big"}]}),
    )
    .await;
    r.assert_error(422, "result_too_large");
    assert_eq!(app.get("t", "marker").await.status, 404);
}

#[tokio::test]
async fn concurrent_transfers_keep_the_sum_through_cluster_nodes() {
    let Some(app) = common::spawn_cluster_app().await else {
        return;
    };
    let app = Arc::new(app);
    let r = app
        .create_table(json!({"name": "acct", "type": "set"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    transfers_keep_the_sum(&app, "acct").await;
    // An abort on a cluster table applies nothing either.
    let r = txn(
        &app,
        "acct",
        json!({"then": [{"op": "put", "key": "a", "value": 0},
                        {"op": "counter", "key": "missing"}]}),
    )
    .await;
    r.assert_error(409, "txn_aborted");
    assert_eq!(r.body["error"]["op"], 1);
    assert_eq!(r.body["error"]["cause"], "key_not_found");
    assert_ne!(app.get("acct", "a").await.body["value"], 0);
}

#[tokio::test]
async fn grouped_keys_past_their_bound_make_the_write_back_run_at_once() {
    let app = common::spawn_with(|c| c.max_grouped_keys = 100).await;
    // Saved once an hour: only the bound can make it write sooner.
    let r = app
        .create_table(json!({"name": "p", "persistence": "periodic", "auto_save_ms": 3_600_000}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let group = |from: usize| {
        let then: Vec<Value> = (from..from + 60)
            .map(|i| json!({"op": "put", "key": format!("k{i}"), "value": i}))
            .collect();
        json!({ "then": then })
    };
    let grouped = "larder_table_grouped_keys{table=\"p\"}";
    let dirty = "larder_table_dirty_objects{table=\"p\"}";
    assert_eq!(txn(&app, "p", group(0)).await.status, 200);
    assert_eq!(app.metric(grouped).await, 60.0);
    assert_eq!(app.metric(dirty).await, 60.0);
    // 120 grouped keys: past the bound of 100, the round runs now and
    // takes every group.
    assert_eq!(txn(&app, "p", group(60)).await.status, 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while app.metric(dirty).await > 0.0 || app.metric(grouped).await > 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the write-back did not run"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
