//! select, select_count, select_delete and multi-get over HTTP, on local
//! tables and (through `conformance!`) on cluster tables through three
//! nodes.

mod common;

use common::{Reply, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

async fn post(app: &TestApp, table: &str, op: &str, body: Value) -> Reply {
    app.send(
        Method::POST,
        &format!("/v1/tables/{table}/{op}"),
        Some(body.to_string().into_bytes()),
        &[],
    )
    .await
}

/// Every result of a select, following cursors, checking each page.
async fn select_all(app: &TestApp, table: &str, mut body: Value) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let r = post(app, table, "select", body.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text);
        let results = r.body["results"].as_array().expect("results");
        if let Some(limit) = body["limit"].as_u64() {
            assert!(results.len() as u64 <= limit, "{}", r.text);
        }
        out.extend(results.iter().cloned());
        match r.body["next_cursor"].as_str() {
            Some(c) => body["cursor"] = json!(c),
            None => return out,
        }
    }
}

async fn users(app: &TestApp, kind: &str) {
    app.table("users", kind).await;
    for (k, v) in [
        (
            "user:1",
            json!({"status": "active", "age": 34, "tags": ["a"]}),
        ),
        ("user:2", json!({"status": "active", "age": 17})),
        ("user:3", json!({"status": "inactive", "age": 50})),
        ("user:4", json!({"status": "active", "age": 18.0})),
        ("user:5", json!({"status": "active", "age": 61})),
        ("other:1", json!({"status": "active", "age": 40})),
    ] {
        let r = app.put("users", k, v).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
}

fn sorted(mut v: Vec<Value>) -> Vec<Value> {
    v.sort_by_key(|x| x.to_string());
    v
}

crate::conformance! {
    async fn the_contract_example_selects_adults_in_a_range(app) {
        users(&app, "ordered_set").await;
        let r = post(&app, "users", "select", json!({
            "match": {"key": "$k", "value": {"status": "active", "age": "$a"}},
            "where": ["and", [">=", "$a", 18], ["is_integer", "$a"]],
            "return": {"user": "$k", "age": "$a"},
            "range": {"prefix": "user:"},
            "limit": 100
        })).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.body,
            json!({"results": [{"user": "user:1", "age": 34}, {"user": "user:5", "age": 61}],
                   "next_cursor": null})
        );
        // The same in reverse order, and `$$` and `$_` returns.
        let r = post(&app, "users", "select", json!({
            "match": {"key": "$k", "value": {"age": "$a"}},
            "where": [">", "$a", 40],
            "return": "$$",
            "reverse": true
        })).await;
        assert_eq!(r.body["results"], json!([{"k": "user:5", "a": 61}, {"k": "user:3", "a": 50}]));
        let r = post(&app, "users", "select", json!({"match": {"key": "user:2"}})).await;
        assert_eq!(
            r.body["results"],
            json!([{"key": "user:2", "value": {"status": "active", "age": 17}}])
        );
        let r = post(&app, "users", "select", json!({})).await;
        assert_eq!(r.body["results"].as_array().unwrap().len(), 6);
    }

    async fn selects_page_with_cursors_on_every_table_type(app) {
        for kind in ["set", "ordered_set", "bag", "duplicate_bag"] {
            let t = format!("t_{kind}");
            app.table(&t, kind).await;
            let mut items = Vec::new();
            for i in 0..40 {
                items.push(json!({"key": format!("k{:02}", i % 25), "value": {"n": i}}));
            }
            let r = app.send(Method::POST, &format!("/v1/tables/{t}/entries"),
                Some(json!(items).to_string().into_bytes()), &[]).await;
            assert_eq!(r.status, 200, "{}", r.text);
            let everything = sorted(app.scan_all(&t, "?limit=7").await.into_iter()
                .map(|(k, v)| json!({"key": k, "value": v})).collect());
            let even = |v: &Value| v["value"]["n"].as_i64().unwrap() % 2 == 0;
            let expected: Vec<Value> = everything.iter().filter(|v| even(v)).cloned().collect();
            let got = select_all(&app, &t, json!({
                "match": {"value": {"n": "$n"}},
                "where": ["==", ["rem", "$n", 2], 0],
                "limit": 3
            })).await;
            if kind == "ordered_set" {
                assert_eq!(got, expected, "{kind}: key order");
            }
            assert_eq!(sorted(got), expected, "{kind}");
            let r = post(&app, &t, "select_count", json!({
                "match": {"value": {"n": "$n"}},
                "where": ["==", ["rem", "$n", 2], 0]
            })).await;
            assert_eq!(r.body, json!({"count": expected.len(), "next_cursor": null}), "{kind}");
        }
    }

    async fn select_delete_removes_exactly_the_matching_objects(app) {
        users(&app, "set").await;
        let r = post(&app, "users", "select_delete", json!({
            "match": {"value": {"status": "active", "age": "$a"}},
            "where": ["<", "$a", 35]
        })).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body, json!({"deleted": 3, "next_cursor": null}));
        let left: Vec<String> = sorted(app.scan_all("users", "").await.into_iter()
            .map(|(k, _)| json!(k)).collect())
            .into_iter().map(|k| k.as_str().unwrap().to_owned()).collect();
        assert_eq!(left, ["other:1", "user:3", "user:5"]);
        // On a duplicate bag, only the matching objects of a key go.
        app.table("d", "duplicate_bag").await;
        for v in [json!(1), json!(2), json!(1), json!(3)] {
            app.put("d", "k", v).await;
        }
        let r = post(&app, "d", "select_delete", json!({"match": {"value": 1}})).await;
        assert_eq!(r.body["deleted"], 2, "{}", r.text);
        assert_eq!(app.get("d", "k").await.body["values"], json!([2, 3]));
        let info = app.get_table("d").await.body;
        assert_eq!(info["size"], 2);
    }

    async fn malformed_specs_are_400_and_name_the_part(app) {
        users(&app, "set").await;
        for (body, needle) in [
            (json!({"where": ["=>", 1, 2]}), "where[0]: unknown operator \"=>\""),
            (json!({"match": {"value": "$v"}, "where": ["and", ["==", "$v", 1], ["=>", "$v", 2]]}),
             "where[2][0]: unknown operator \"=>\""),
            (json!({"match": "_", "return": "$nope"}), "return: $nope is not bound by match"),
            (json!({"match": {"value": {"a": "$bad-name"}}}), "match.value.a"),
            (json!({"match": "$_"}), "match: \"$_\" is allowed only in return"),
            (json!({"where": ["not", true, true]}), "where: \"not\" takes 1 argument, not 2"),
            (json!({"where": {"a": 1}}), "where: an object in a guard"),
            (json!({"limit": 1, "bogus": 1}), "bogus: not a member"),
        ] {
            let r = post(&app, "users", "select", body.clone()).await;
            r.assert_error(400, "invalid_match_spec");
            assert!(r.body["error"]["message"].as_str().unwrap().contains(needle),
                "{body}: {}", r.text);
        }
        for op in ["select_count", "select_delete"] {
            post(&app, "users", op, json!({"limit": 5})).await
                .assert_error(400, "invalid_match_spec");
        }
        for body in [
            json!({"limit": 0}),
            json!({"limit": 10001}),
            json!({"range": {"start": "a", "after": "b"}}),
            json!({"cursor": "zz"}),
            json!({"range": "user:"}),
        ] {
            post(&app, "users", "select", body.clone()).await
                .assert_error(400, "invalid_argument");
        }
        post(&app, "users", "select", json!([1])).await.assert_error(400, "invalid_match_spec");
        post(&app, "nope", "select", json!({})).await.assert_error(404, "table_not_found");
        // Nothing changed.
        assert_eq!(app.get_table("users").await.body["size"], 6);
    }

    async fn guards_that_fail_at_run_time_do_not_match(app) {
        users(&app, "set").await;
        let r = post(&app, "users", "select", json!({
            "match": {"key": "$k", "value": "$v"},
            "where": ["==", ["get", ["get", "$v", "tags"], 0], "a"],
            "return": "$k"
        })).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["results"], json!(["user:1"]));
        let r = post(&app, "users", "select_count", json!({
            "match": {"value": {"age": "$a"}},
            "where": [">", ["div", 100, ["-", "$a", 34]], 0]
        })).await;
        // user:1 divides by zero and user:4's float age cannot `div`: neither
        // counts; user:2's quotient is negative; the other three count.
        assert_eq!(r.body["count"], 3, "{}", r.text);
    }

    async fn multi_get_answers_in_request_order(app) {
        users(&app, "set").await;
        let r = post(&app, "users", "lookup", json!({"keys": ["user:3", "nobody", "user:1", "user:3", "gone"]})).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body, json!({
            "entries": [
                {"key": "user:3", "value": {"status": "inactive", "age": 50}, "ttl_ms": null},
                {"key": "user:1", "value": {"status": "active", "age": 34, "tags": ["a"]}, "ttl_ms": null}
            ],
            "missing": ["nobody", "gone"]
        }));
        let many: Vec<String> = (0..1001).map(|i| format!("k{i}")).collect();
        for body in [json!({"keys": []}), json!({"keys": many}), json!({"keys": [1]}),
                     json!({"keys": [""]}), json!({"key": ["a"]}), json!(["a"])] {
            let r = post(&app, "users", "lookup", body.clone()).await;
            assert_eq!(r.status, 400, "{body}: {}", r.text);
        }
    }
}

#[tokio::test]
async fn the_scan_budget_ends_a_page_early_with_a_cursor() {
    let app = common::spawn_with(|c| c.max_select_scan = 10).await;
    app.table("o", "ordered_set").await;
    app.table("h", "set").await;
    for t in ["o", "h"] {
        let items: Vec<Value> = (0..95)
            .map(|i| json!({"key": format!("k{i:03}"), "value": i}))
            .collect();
        let r = app
            .send(
                Method::POST,
                &format!("/v1/tables/{t}/entries"),
                Some(json!(items).to_string().into_bytes()),
                &[],
            )
            .await;
        assert_eq!(r.status, 200);
        // Only k090..k094 match: the first page runs out of budget first.
        let spec = json!({"match": {"value": "$v"}, "where": [">=", "$v", 90], "return": "$v", "limit": 100});
        let r = post(&app, t, "select", spec.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text);
        if t == "o" {
            assert_eq!(r.body["results"], json!([]), "{}", r.text);
        }
        assert!(r.body["next_cursor"].is_string(), "{}", r.text);
        let mut got: Vec<i64> = select_all(&app, t, spec)
            .await
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        got.sort_unstable();
        assert_eq!(got, vec![90, 91, 92, 93, 94], "{t}");
        // Counting adds up over the pages.
        let mut body = json!({"where": true});
        let mut total = 0;
        loop {
            let r = post(&app, t, "select_count", body.clone()).await;
            total += r.body["count"].as_u64().unwrap();
            match r.body["next_cursor"].as_str() {
                Some(c) => body["cursor"] = json!(c),
                None => break,
            }
        }
        assert_eq!(total, 95, "{t}");
    }
}

#[tokio::test]
async fn expired_entries_never_match() {
    let app = common::spawn_with_manual_clock().await;
    app.table("s", "set").await;
    app.put_with("s", "short", json!(1), "?ttl_ms=1000", &[])
        .await;
    app.put("s", "long", json!(2)).await;
    app.advance(2000);
    let r = post(&app, "s", "select", json!({"return": "$_"})).await;
    assert_eq!(r.body["results"], json!([{"key": "long", "value": 2}]));
    let r = post(&app, "s", "select", json!({"match": {"key": "short"}})).await;
    assert_eq!(r.body["results"], json!([]));
    let r = post(&app, "s", "select_delete", json!({})).await;
    assert_eq!(r.body["deleted"], 1);
}

#[tokio::test]
async fn select_delete_on_a_sync_table_is_durable_when_it_answers() {
    let app = common::spawn_app().await;
    let r = app
        .create_table(json!({"name": "s", "persistence": "sync"}))
        .await;
    assert_eq!(r.status, 201);
    for i in 0..20 {
        app.put("s", &format!("k{i}"), json!(i)).await;
    }
    let r = post(
        &app,
        "s",
        "select_delete",
        json!({"match": {"value": "$v"}, "where": ["<", "$v", 15]}),
    )
    .await;
    assert_eq!(r.body["deleted"], 15);
    let dir = app.stop().await;
    let again = common::spawn_on(dir).await;
    assert_eq!(again.get_table("s").await.body["size"], 5);
}
