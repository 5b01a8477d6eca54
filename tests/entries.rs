//! Entry endpoints over real HTTP: each ETS operation per table type, ETags
//! and conditional requests, bulk insert, take, delete_object, merge patch.

mod common;

use common::{enc, spawn_app, Reply};
use reqwest::Method;
use serde_json::json;

crate::conformance! {
    async fn put_then_get_returns_the_value_with_an_etag(app) {
        app.table("t", "set").await;
        let r = app
            .put("t", "alice", json!({"name": "Alice", "age": 31}))
            .await;
        assert_eq!(r.status, 201);
        assert_eq!(r.body, json!({"key": "alice", "created": true}));
        let etag = r.header("etag").expect("etag on put").to_owned();

        let g = app.get("t", "alice").await;
        assert_eq!(g.status, 200);
        assert_eq!(
            g.body,
            json!({"key": "alice", "value": {"age": 31, "name": "Alice"}, "ttl_ms": null})
        );
        assert_eq!(g.header("etag"), Some(etag.as_str()));
        assert_eq!(g.header("x-cache"), Some("HIT"));
        assert_eq!(g.header("content-type"), Some("application/json"));

        let again = app.put("t", "alice", json!(2)).await;
        assert_eq!(again.status, 200);
        assert_eq!(again.body["created"], false);
        assert_ne!(again.header("etag"), Some(etag.as_str()));
        assert_eq!(app.get("t", "alice").await.body["value"], 2);
    }

    async fn missing_keys_are_404_with_x_cache_miss(app) {
        app.table("t", "set").await;
        let r = app.get("t", "nobody").await;
        r.assert_error(404, "key_not_found");
        assert_eq!(r.header("x-cache"), Some("MISS"));
        app.get("nope", "k")
            .await
            .assert_error(404, "table_not_found");
    }

    async fn if_none_match_with_the_current_etag_is_304(app) {
        app.table("t", "set").await;
        let etag = app
            .put("t", "k", json!("v"))
            .await
            .header("etag")
            .unwrap()
            .to_owned();
        let r = app
            .send(
                Method::GET,
                "/v1/tables/t/entries/k",
                None,
                &[("if-none-match", &etag)],
            )
            .await;
        assert_eq!(r.status, 304);
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        let r = app
            .send(
                Method::GET,
                "/v1/tables/t/entries/k",
                None,
                &[("if-none-match", "\"999999\"")],
            )
            .await;
        assert_eq!(r.status, 200);
    }

    async fn head_is_member(app) {
        app.table("t", "bag").await;
        app.put("t", "k", json!(1)).await;
        let yes = app
            .send(Method::HEAD, "/v1/tables/t/entries/k", None, &[])
            .await;
        assert_eq!(yes.status, 200);
        assert!(yes.text.is_empty());
        let no = app
            .send(Method::HEAD, "/v1/tables/t/entries/x", None, &[])
            .await;
        assert_eq!(no.status, 404);
        assert!(no.text.is_empty());
    }

    async fn if_none_match_star_is_insert_new(app) {
        app.table("t", "set").await;
        let first = app
            .put_with("t", "k", json!(1), "", &[("if-none-match", "*")])
            .await;
        assert_eq!(first.status, 201);
        let second = app
            .put_with("t", "k", json!(2), "", &[("if-none-match", "*")])
            .await;
        second.assert_error(412, "precondition_failed");
        assert_eq!(app.get("t", "k").await.body["value"], 1);
    }

    async fn if_match_is_compare_and_swap(app) {
        app.table("t", "set").await;
        let v1 = app
            .put("t", "k", json!(1))
            .await
            .header("etag")
            .unwrap()
            .to_owned();
        let ok = app
            .put_with("t", "k", json!(2), "", &[("if-match", &v1)])
            .await;
        assert_eq!(ok.status, 200);
        // The old tag no longer matches: the entry changed.
        let stale = app
            .put_with("t", "k", json!(3), "", &[("if-match", &v1)])
            .await;
        stale.assert_error(412, "precondition_failed");
        assert_eq!(app.get("t", "k").await.body["value"], 2);
        // Absent key: If-Match fails and nothing is created.
        let absent = app
            .put_with("t", "new", json!(1), "", &[("if-match", &v1)])
            .await;
        absent.assert_error(412, "precondition_failed");
        app.get("t", "new").await.assert_error(404, "key_not_found");
        // Conditional delete.
        let v2 = app.get("t", "k").await.header("etag").unwrap().to_owned();
        app.send(
            Method::DELETE,
            "/v1/tables/t/entries/k",
            None,
            &[("if-match", &v1)],
        )
        .await
        .assert_error(412, "precondition_failed");
        let del = app
            .send(
                Method::DELETE,
                "/v1/tables/t/entries/k",
                None,
                &[("if-match", &v2)],
            )
            .await;
        assert_eq!(del.status, 204);
    }

    async fn malformed_etags_are_400_and_change_nothing(app) {
        app.table("t", "set").await;
        app.put("t", "k", json!(1)).await;
        for bad in ["abc", "\"unterminated", "W/x"] {
            app.put_with("t", "k", json!(2), "", &[("if-match", bad)])
                .await
                .assert_error(400, "invalid_argument");
        }
        app.put_with("t", "k", json!(2), "", &[("if-none-match", "\"1\"")])
            .await
            .assert_error(400, "invalid_argument");
        assert_eq!(app.get("t", "k").await.body["value"], 1);
    }

    async fn bag_keeps_distinct_values_in_insertion_order(app) {
        app.table("b", "bag").await;
        assert_eq!(app.put("b", "k", json!("red")).await.status, 201);
        assert_eq!(app.put("b", "k", json!("red")).await.status, 200);
        app.put("b", "k", json!({"b": 1, "a": 2})).await;
        // Same object, members in another order: identical, not added.
        app.send(
            Method::PUT,
            "/v1/tables/b/entries/k",
            Some(br#"{"a":2,"b":1}"#.to_vec()),
            &[],
        )
        .await;
        app.put("b", "k", json!("blue")).await;
        let g = app.get("b", "k").await;
        assert_eq!(g.body["values"], json!(["red", {"a": 2, "b": 1}, "blue"]));
        assert_eq!(app.get_table("b").await.body["size"], 3);
    }

    async fn duplicate_bag_keeps_every_copy_and_delete_object_removes_all_copies(app) {
        app.table("d", "duplicate_bag").await;
        for v in [json!(1), json!(2), json!(1), json!(3), json!(1)] {
            app.put("d", "k", v).await;
        }
        assert_eq!(
            app.get("d", "k").await.body["values"],
            json!([1, 2, 1, 3, 1])
        );
        let r = app
            .send(
                Method::POST,
                "/v1/tables/d/entries/k/delete_object",
                Some(b"1".to_vec()),
                &[],
            )
            .await;
        assert_eq!(r.status, 204);
        assert_eq!(app.get("d", "k").await.body["values"], json!([2, 3]));
        assert_eq!(app.get_table("d").await.body["size"], 2);
    }

    async fn delete_object_on_a_set_removes_only_an_identical_value(app) {
        app.table("s", "set").await;
        app.put("s", "k", json!({"x": 1})).await;
        app.send(
            Method::POST,
            "/v1/tables/s/entries/k/delete_object",
            Some(b"{\"x\":2}".to_vec()),
            &[],
        )
        .await;
        assert_eq!(app.get("s", "k").await.status, 200);
        app.send(
            Method::POST,
            "/v1/tables/s/entries/k/delete_object",
            Some(b" {\"x\" : 1} ".to_vec()),
            &[],
        )
        .await;
        app.get("s", "k").await.assert_error(404, "key_not_found");
        // Absent key: still 204.
        let r = app
            .send(
                Method::POST,
                "/v1/tables/s/entries/zz/delete_object",
                Some(b"1".to_vec()),
                &[],
            )
            .await;
        assert_eq!(r.status, 204);
    }

    async fn delete_removes_every_object_and_is_204_when_absent(app) {
        app.table("b", "bag").await;
        app.put("b", "k", json!(1)).await;
        app.put("b", "k", json!(2)).await;
        assert_eq!(app.delete("b", "k").await.status, 204);
        app.get("b", "k").await.assert_error(404, "key_not_found");
        assert_eq!(app.delete("b", "k").await.status, 204);
        assert_eq!(app.get_table("b").await.body["size"], 0);
    }

    async fn take_returns_and_removes(app) {
        app.table("b", "bag").await;
        app.put("b", "k", json!("x")).await;
        app.put("b", "k", json!("y")).await;
        let r = app
            .send(Method::POST, "/v1/tables/b/entries/k/take", None, &[])
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            json!({"key": "k", "values": ["x", "y"], "ttl_ms": null})
        );
        app.send(Method::POST, "/v1/tables/b/entries/k/take", None, &[])
            .await
            .assert_error(404, "key_not_found");
    }

    async fn merge_patch_updates_objects_atomically(app) {
        app.table("s", "set").await;
        app.put("s", "u", json!({"name": "A", "tags": {"x": 1, "y": 2}}))
            .await;
        let r = app
            .send(
                Method::PATCH,
                "/v1/tables/s/entries/u",
                Some(br#"{"name":"B","tags":{"x":null},"new":true}"#.to_vec()),
                &[],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(
            r.body["value"],
            json!({"name": "B", "tags": {"y": 2}, "new": true})
        );
        assert!(r.header("etag").is_some());

        let patch = |path: &'static str, body: &'static [u8]| {
            app.send(Method::PATCH, path, Some(body.to_vec()), &[])
        };
        patch("/v1/tables/s/entries/missing", b"{}")
            .await
            .assert_error(404, "key_not_found");
        patch("/v1/tables/s/entries/u", b"[1]")
            .await
            .assert_error(400, "invalid_argument");
        patch("/v1/tables/s/entries/u", b"{oops")
            .await
            .assert_error(400, "invalid_json");
        app.put("s", "n", json!(5)).await;
        patch("/v1/tables/s/entries/n", b"{\"a\":1}")
            .await
            .assert_error(409, "not_an_object");
        app.table("b", "bag").await;
        app.put("b", "k", json!({})).await;
        patch("/v1/tables/b/entries/k", b"{\"a\":1}")
            .await
            .assert_error(409, "wrong_table_type");
        assert_eq!(
            app.get("s", "u").await.body["value"],
            json!({"name": "B", "tags": {"y": 2}, "new": true})
        );
    }

    async fn bulk_insert_is_all_or_nothing(app) {
        app.table("s", "set").await;
        let ok = app
            .send(
                Method::POST,
                "/v1/tables/s/entries",
                Some(json!([{"key": "a", "value": 1}, {"key": "b", "value": [2], "ttl_ms": 60000}, {"key": "a", "value": 3}]).to_string().into_bytes()),
                &[],
            )
            .await;
        assert_eq!(ok.status, 200, "{}", ok.text);
        assert_eq!(ok.body, json!({"inserted": 3}));
        assert_eq!(app.get("s", "a").await.body["value"], 3);
        assert!(app.get("s", "b").await.body["ttl_ms"].as_u64().is_some());

        // One bad item anywhere: nothing from the request is written.
        for bad in [
            json!([{"key": "c", "value": 1}, {"key": "", "value": 2}]),
            json!([{"key": "c", "value": 1}, {"key": "d", "value": 2, "ttl_ms": 0}]),
            json!([{"key": "c", "value": 1}, {"key": "d", "value": 2, "extra": 1}]),
            json!([{"key": "c", "value": 1}, {"key": "d"}]),
            json!([{"key": "c", "value": 1}, {"key": 5, "value": 1}]),
            json!({"key": "c", "value": 1}),
        ] {
            let r = app
                .send(
                    Method::POST,
                    "/v1/tables/s/entries",
                    Some(bad.to_string().into_bytes()),
                    &[],
                )
                .await;
            assert_eq!(r.status, 400, "{bad}: {}", r.text);
            app.get("s", "c").await.assert_error(404, "key_not_found");
        }
    }

    async fn bulk_items_are_stored_as_a_put_stores_them(app) {
        app.table("s", "set").await;
        // Escapes in a key, members out of order, spaces, a number with a
        // trailing zero: stored in canonical form, as a PUT stores them.
        let body = br#"[ {"key": "k\u0065y", "value": { "b" : 1, "a" : [1, 2.50, "\u00e9"] } },
                         {"ttl_ms": 60000, "value": "x", "key": "t"} ]"#;
        let r = app
            .send(Method::POST, "/v1/tables/s/entries", Some(body.to_vec()), &[])
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let got = app.get("s", "key").await;
        assert_eq!(got.body["value"], json!({"a": [1, 2.5, "é"], "b": 1}));
        assert!(got.text.contains(r#"{"a":[1,2.5,"é"],"b":1}"#), "{}", got.text);
        assert!(app.get("s", "t").await.body["ttl_ms"].as_u64().is_some());
        // A repeated member anywhere is malformed JSON, and nothing is written.
        let r = app
            .send(
                Method::POST,
                "/v1/tables/s/entries",
                Some(br#"[{"key": "c", "value": 1}, {"key": "d", "value": {"x": 1, "x": 2}}]"#.to_vec()),
                &[],
            )
            .await;
        r.assert_error(400, "invalid_json");
        app.get("s", "c").await.assert_error(404, "key_not_found");
    }

    async fn bulk_insert_into_a_full_table_is_undone(app) {
        let r = app
            .create_table(json!({"name": "f", "max_entries": 3}))
            .await;
        assert_eq!(r.status, 201);
        app.put("f", "a", json!(1)).await;
        let r = app
            .send(
                Method::POST,
                "/v1/tables/f/entries",
                Some(json!([{"key": "a", "value": 9}, {"key": "b", "value": 2}, {"key": "c", "value": 3}, {"key": "d", "value": 4}]).to_string().into_bytes()),
                &[],
            )
            .await;
        r.assert_error(507, "table_full");
        assert_eq!(app.get("f", "a").await.body["value"], 1);
        app.get("f", "b").await.assert_error(404, "key_not_found");
        app.get("f", "c").await.assert_error(404, "key_not_found");
        let info = app.get_table("f").await.body;
        assert_eq!(info["size"], 1);
        assert_eq!(info["stats"]["inserts"], 1);
    }

    async fn a_full_table_without_eviction_answers_507_and_changes_nothing(app) {
        app.create_table(json!({"name": "f", "max_entries": 2}))
            .await;
        app.put("f", "a", json!(1)).await;
        app.put("f", "b", json!(2)).await;
        app.put("f", "c", json!(3))
            .await
            .assert_error(507, "table_full");
        app.get("f", "c").await.assert_error(404, "key_not_found");
        // Replacing an existing key needs no room.
        assert_eq!(app.put("f", "a", json!(10)).await.status, 200);
        app.counter("f", "new", json!({"default": 0}))
            .await
            .assert_error(507, "table_full");
        assert_eq!(app.get_table("f").await.body["size"], 2);
    }

    async fn keys_with_reserved_characters_round_trip(app) {
        app.table("t", "ordered_set").await;
        let keys = [
            "a/b",
            "with space",
            "q?x=1&y",
            "ключ",
            "emoji 🎉",
            "%41",
            "#frag",
            "..dots..",
        ];
        for k in keys {
            assert_eq!(app.put("t", k, json!(k)).await.status, 201, "{k}");
        }
        for k in keys {
            let g = app.get("t", k).await;
            assert_eq!(g.body["key"], k);
            assert_eq!(g.body["value"], k);
        }
        assert_eq!(app.scan_all("t", "").await.len(), keys.len());
    }

    async fn ttl_is_reported_and_validated(app) {
        app.table("t", "set").await;
        let r = app.put_with("t", "k", json!(1), "?ttl_ms=60000", &[]).await;
        assert_eq!(r.status, 201);
        let ttl = app.get("t", "k").await.body["ttl_ms"].as_u64().unwrap();
        assert!(ttl > 0 && ttl <= 60000);
        for q in [
            "?ttl_ms=0",
            "?ttl_ms=-5",
            "?ttl_ms=abc",
            "?ttl_ms=1e3",
            "?ttl_ms=99999999999999999999",
            "?ttl_ms=1&ttl_ms=2",
            "?tll_ms=5",
        ] {
            app.put_with("t", "k", json!(2), q, &[])
                .await
                .assert_error(400, "invalid_argument");
        }
        assert_eq!(app.get("t", "k").await.body["value"], 1);
        // A write without ttl_ms clears the expiry (no table default).
        app.put("t", "k", json!(3)).await;
        assert_eq!(
            app.get("t", "k").await.body["ttl_ms"],
            serde_json::Value::Null
        );
    }

    async fn key_limits_are_enforced(app) {
        app.table("t", "set").await;
        let max = "k".repeat(1024);
        assert_eq!(app.put("t", &max, json!(1)).await.status, 201);
        let long = "k".repeat(1025);
        app.put("t", &long, json!(1))
            .await
            .assert_error(400, "invalid_key");
        app.get("t", &long).await.assert_error(400, "invalid_key");
        app.put("t", "a\0b", json!(1))
            .await
            .assert_error(400, "invalid_key");
        let r = app
            .send(
                Method::PUT,
                "/v1/tables/t/entries/%FF%FE",
                Some(b"1".to_vec()),
                &[],
            )
            .await;
        r.assert_error(400, "invalid_key");
        assert_eq!(app.get_table("t").await.body["size"], 1);
        let _ = Reply::from; // keep the helper type in scope for readers
        let _ = enc("x");
    }
}

#[tokio::test]
async fn stats_count_hits_misses_inserts_and_deletes() {
    let app = spawn_app().await;
    app.table("t", "set").await;
    app.put("t", "a", json!(1)).await;
    app.put("t", "b", json!(1)).await;
    app.get("t", "a").await;
    app.get("t", "a").await;
    app.get("t", "zz").await;
    app.delete("t", "a").await;
    let s = &app.get_table("t").await.body["stats"];
    assert_eq!(s["hits"], 2);
    assert_eq!(s["misses"], 1);
    assert_eq!(s["inserts"], 2);
    assert_eq!(s["deletes"], 1);
    assert_eq!(s["expired"], 0);
}
