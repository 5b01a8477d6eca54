//! update_counter over HTTP, including exactness under 64 concurrent clients.

mod common;

use common::spawn_app;
use reqwest::Method;
use serde_json::json;

crate::conformance! {
    async fn counters_follow_ets_update_counter(app) {
        app.table("c", "set").await;
        app.counter("c", "n", json!({}))
            .await
            .assert_error(404, "key_not_found");
        let r = app
            .counter("c", "n", json!({"incr": 5, "default": 10}))
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, json!({"key": "n", "value": 15}));
        // Empty body: incr 1.
        let r = app
            .send(Method::POST, "/v1/tables/c/entries/n/counter", None, &[])
            .await;
        assert_eq!(r.body["value"], 16);
        assert_eq!(
            app.counter("c", "n", json!({"incr": -20})).await.body["value"],
            -4
        );
        assert_eq!(app.get("c", "n").await.body["value"], -4);
    }

    async fn thresholds_wrap_like_ets(app) {
        app.table("c", "set").await;
        app.put("c", "n", json!(8)).await;
        let op = json!({"incr": 1, "threshold": 9, "set_value": 0});
        assert_eq!(app.counter("c", "n", op.clone()).await.body["value"], 9);
        assert_eq!(app.counter("c", "n", op).await.body["value"], 0);
        let down = json!({"incr": -1, "threshold": 0, "set_value": 100});
        assert_eq!(app.counter("c", "n", down).await.body["value"], 100);
        app.counter("c", "n", json!({"incr": 1, "threshold": 5}))
            .await
            .assert_error(400, "invalid_argument");
    }

    async fn field_counters_update_one_member(app) {
        app.table("c", "set").await;
        app.put("c", "u", json!({"visits": 1, "name": "a"})).await;
        let r = app
            .counter("c", "u", json!({"field": "visits", "incr": 2}))
            .await;
        assert_eq!(r.body["value"], 3);
        assert_eq!(
            app.get("c", "u").await.body["value"],
            json!({"visits": 3, "name": "a"})
        );
        app.counter("c", "u", json!({"field": "name"}))
            .await
            .assert_error(409, "not_a_counter");
        let r = app
            .counter("c", "new", json!({"field": "hits", "default": 0}))
            .await;
        assert_eq!(r.body["value"], 1);
        assert_eq!(app.get("c", "new").await.body["value"], json!({"hits": 1}));
    }

    async fn non_integers_overflow_and_bags_are_409(app) {
        app.table("c", "set").await;
        for v in [
            json!("1"),
            json!(1.5),
            json!([1]),
            json!(18446744073709551615u64),
        ] {
            app.put("c", "x", v.clone()).await;
            app.counter("c", "x", json!({}))
                .await
                .assert_error(409, "not_a_counter");
            assert_eq!(app.get("c", "x").await.body["value"], v, "unchanged");
        }
        app.put("c", "max", json!(i64::MAX)).await;
        app.counter("c", "max", json!({}))
            .await
            .assert_error(409, "overflow");
        assert_eq!(app.get("c", "max").await.body["value"], json!(i64::MAX));
        app.put("c", "min", json!(i64::MIN)).await;
        app.counter("c", "min", json!({"incr": -1}))
            .await
            .assert_error(409, "overflow");
        app.table("b", "bag").await;
        app.counter("b", "k", json!({"default": 0}))
            .await
            .assert_error(409, "wrong_table_type");
        app.table("d", "duplicate_bag").await;
        app.counter("d", "k", json!({}))
            .await
            .assert_error(409, "wrong_table_type");
    }

    async fn bad_counter_bodies_are_400(app) {
        app.table("c", "set").await;
        app.put("c", "n", json!(1)).await;
        for body in [
            json!({"incr": "1"}),
            json!({"incr": 1.5}),
            json!({"incr": 9223372036854775808u64}),
            json!({"inc": 1}),
            json!({"field": ""}),
            json!([1]),
        ] {
            app.counter("c", "n", body)
                .await
                .assert_error(400, "invalid_argument");
        }
        let r = app
            .send(
                Method::POST,
                "/v1/tables/c/entries/n/counter",
                Some(b"{".to_vec()),
                &[],
            )
            .await;
        r.assert_error(400, "invalid_json");
        assert_eq!(app.get("c", "n").await.body["value"], 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_clients_incrementing_500_times_reach_exactly_32000() {
    let app = spawn_app().await;
    app.table("c", "set").await;
    let url = format!("{}/counter", app.entry_url("c", "hits"));
    let mut tasks = Vec::new();
    for _ in 0..64 {
        // One client per task: 64 independent keep-alive connections.
        let client = reqwest::Client::new();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..500 {
                let r = client
                    .post(&url)
                    .body(r#"{"incr":1,"default":0}"#)
                    .send()
                    .await
                    .expect("counter request");
                assert_eq!(r.status(), 200);
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(app.get("c", "hits").await.body["value"], 32000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bag_inserts_lose_nothing() {
    let app = spawn_app().await;
    app.table("b", "duplicate_bag").await;
    app.table("u", "bag").await;
    let mut tasks = Vec::new();
    for c in 0..32 {
        let client = reqwest::Client::new();
        let d = app.entry_url("b", "k");
        let u = app.entry_url("u", "k");
        tasks.push(tokio::spawn(async move {
            for i in 0..50 {
                let v = format!("{{\"c\":{c},\"i\":{i}}}");
                for url in [&d, &u] {
                    let r = client.put(url).body(v.clone()).send().await.expect("put");
                    assert!(r.status().is_success());
                }
                // Everyone also adds the same value: a bag keeps one copy.
                client.put(&u).body("\"shared\"").send().await.expect("put");
            }
        }));
    }
    for t in tasks {
        t.await.expect("client task");
    }
    assert_eq!(
        app.get("b", "k").await.body["values"]
            .as_array()
            .unwrap()
            .len(),
        1600
    );
    assert_eq!(
        app.get("u", "k").await.body["values"]
            .as_array()
            .unwrap()
            .len(),
        1601
    );
    assert_eq!(app.get_table("b").await.body["size"], 1600);
    assert_eq!(app.get_table("u").await.body["size"], 1601);
}
