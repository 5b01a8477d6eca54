//! Malformed input gets the documented 4xx with the JSON error body, and a
//! read afterwards shows nothing changed.

mod common;

use common::spawn_with;
use reqwest::Method;
use serde_json::json;

const LIMIT: usize = 64 * 1024;

async fn app_with_data() -> common::TestApp {
    let app = spawn_with(|c| c.max_body_bytes = LIMIT).await;
    app.table("s", "set").await;
    app.table("b", "bag").await;
    app.put("s", "k", json!({"v": 1})).await;
    app.put("b", "k", json!(1)).await;
    app
}

async fn assert_unchanged(app: &common::TestApp) {
    assert_eq!(app.get("s", "k").await.body["value"], json!({"v": 1}));
    assert_eq!(app.get("b", "k").await.body["values"], json!([1]));
    let s = app.get_table("s").await.body;
    assert_eq!(s["size"], 1);
    let tables = app.send(Method::GET, "/v1/tables", None, &[]).await;
    assert_eq!(tables.body["tables"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn invalid_json_bodies_are_invalid_json() {
    let app = app_with_data().await;
    for body in [
        &b""[..],
        b"{",
        b"{\"v\":}",
        b"nul",
        b"1 2",
        b"\"unterminated",
        b"\xff\xfe",
        b"[1,]",
        b"{'a':1}",
    ] {
        for (method, path) in [
            (Method::PUT, "/v1/tables/s/entries/k"),
            (Method::PATCH, "/v1/tables/s/entries/k"),
            (Method::POST, "/v1/tables/s/entries"),
            (Method::POST, "/v1/tables"),
            (Method::POST, "/v1/tables/b/entries/k/delete_object"),
        ] {
            let r = app
                .send(method.clone(), path, Some(body.to_vec()), &[])
                .await;
            r.assert_error(400, "invalid_json");
        }
    }
    assert_unchanged(&app).await;
}

#[tokio::test]
async fn content_type_does_not_matter() {
    let app = app_with_data().await;
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/octet-stream",
    ] {
        let r = app
            .send(
                Method::PUT,
                "/v1/tables/s/entries/ct",
                Some(b"{\"x\":1}".to_vec()),
                &[("content-type", ct)],
            )
            .await;
        assert!(r.status.is_success(), "{ct}: {}", r.text);
    }
    assert_eq!(app.get("s", "ct").await.body["value"], json!({"x": 1}));
}

#[tokio::test]
async fn deeply_nested_json_is_rejected_without_crashing() {
    let app = app_with_data().await;
    for depth in [200usize, 20_000] {
        let body = format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes();
        let body = body[..body.len().min(LIMIT)].to_vec();
        let r = app
            .send(Method::PUT, "/v1/tables/s/entries/deep", Some(body), &[])
            .await;
        r.assert_error(400, "invalid_json");
    }
    // Nesting within the limit is stored.
    let ok = format!("{}{}", "[".repeat(100), "]".repeat(100)).into_bytes();
    let r = app
        .send(Method::PUT, "/v1/tables/s/entries/deep", Some(ok), &[])
        .await;
    assert_eq!(r.status, 201);
    assert_eq!(
        app.send(Method::GET, "/healthz", None, &[]).await.status,
        200
    );
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = app_with_data().await;
    let big = format!("\"{}\"", "x".repeat(LIMIT + 10)).into_bytes();
    for (method, path) in [
        (Method::PUT, "/v1/tables/s/entries/k"),
        (Method::POST, "/v1/tables/s/entries"),
        (Method::POST, "/v1/tables"),
        (Method::PATCH, "/v1/tables/s/entries/k"),
    ] {
        let r = app.send(method, path, Some(big.clone()), &[]).await;
        r.assert_error(413, "payload_too_large");
    }
    assert_unchanged(&app).await;
    // Just under the limit is fine.
    let fits = format!("\"{}\"", "x".repeat(LIMIT - 100)).into_bytes();
    let r = app
        .send(Method::PUT, "/v1/tables/s/entries/fits", Some(fits), &[])
        .await;
    assert_eq!(r.status, 201);
}

#[tokio::test]
async fn bad_names_and_keys_in_paths() {
    let app = app_with_data().await;
    for path in [
        "/v1/tables/bad%20name/entries/k",
        "/v1/tables/%FF/entries/k",
        "/v1/tables/x%00y/entries/k",
        &format!("/v1/tables/{}/entries/k", "n".repeat(65)),
    ] {
        let r = app.send(Method::PUT, path, Some(b"1".to_vec()), &[]).await;
        r.assert_error(400, "invalid_name");
    }
    for path in [
        "/v1/tables/s/entries/%FF",
        "/v1/tables/s/entries/a%00b",
        "/v1/tables/s/entries/%C3%28",
        &format!("/v1/tables/s/entries/{}", "k".repeat(1025)),
    ] {
        for method in [Method::PUT, Method::GET, Method::DELETE] {
            let r = app
                .send(method.clone(), path, Some(b"1".to_vec()), &[])
                .await;
            r.assert_error(400, "invalid_key");
        }
    }
    assert_unchanged(&app).await;
}

#[tokio::test]
async fn wrong_types_in_every_body_field() {
    let app = app_with_data().await;
    let cases: &[(Method, &str, serde_json::Value)] = &[
        (Method::POST, "/v1/tables", json!({"name": "x", "type": 1})),
        (
            Method::POST,
            "/v1/tables",
            json!({"name": "x", "access": true}),
        ),
        (
            Method::POST,
            "/v1/tables",
            json!({"name": "x", "persistence": []}),
        ),
        (
            Method::POST,
            "/v1/tables",
            json!({"name": "x", "max_entries": "10"}),
        ),
        (
            Method::POST,
            "/v1/tables",
            json!({"name": "x", "origin": 5}),
        ),
        (
            Method::POST,
            "/v1/tables",
            json!({"name": "x", "default_ttl_ms": 1.5}),
        ),
        (Method::PATCH, "/v1/tables/s", json!({"max_entries": -1})),
        (
            Method::PATCH,
            "/v1/tables/s",
            json!({"eviction": null, "extra": 1}),
        ),
        (Method::PATCH, "/v1/tables/s", json!([])),
        (
            Method::POST,
            "/v1/tables/s/entries",
            json!([{"key": [], "value": 1}]),
        ),
        (
            Method::POST,
            "/v1/tables/s/entries",
            json!([{"key": "a", "value": 1, "ttl_ms": "1"}]),
        ),
        (Method::POST, "/v1/tables/s/entries", json!([["a", 1]])),
        (Method::POST, "/v1/tables/s/entries", json!("not a list")),
        (
            Method::POST,
            "/v1/tables/s/entries/k/counter",
            json!({"default": "0"}),
        ),
        (
            Method::POST,
            "/v1/tables/s/entries/k/counter",
            json!({"threshold": 1e99, "set_value": 0}),
        ),
        (
            Method::POST,
            "/v1/tables/s/entries/k/counter",
            json!({"field": 3}),
        ),
        (
            Method::PATCH,
            "/v1/tables/s/entries/k",
            json!("string patch"),
        ),
        (Method::PATCH, "/v1/tables/s/entries/k", json!(null)),
    ];
    for (method, path, body) in cases {
        let r = app
            .send(
                method.clone(),
                path,
                Some(body.to_string().into_bytes()),
                &[],
            )
            .await;
        r.assert_error(400, "invalid_argument");
    }
    assert_unchanged(&app).await;
}

#[tokio::test]
async fn huge_numbers_are_values_not_errors_but_never_counters() {
    let app = app_with_data().await;
    let r = app
        .send(
            Method::PUT,
            "/v1/tables/s/entries/big",
            Some(b"123456789012345678901234567890".to_vec()),
            &[],
        )
        .await;
    assert_eq!(r.status, 201);
    app.counter("s", "big", json!({}))
        .await
        .assert_error(409, "not_a_counter");
    let r = app
        .send(
            Method::PUT,
            "/v1/tables/s/entries/huge",
            Some(b"1e400".to_vec()),
            &[],
        )
        .await;
    r.assert_error(400, "invalid_json");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = app_with_data().await;
    app.send(Method::GET, "/v2/nothing", None, &[])
        .await
        .assert_error(404, "not_found");
    app.send(Method::POST, "/v1/tables/s/entries/k", None, &[])
        .await
        .assert_error(405, "method_not_allowed");
    app.send(Method::PUT, "/v1/tables", None, &[])
        .await
        .assert_error(405, "method_not_allowed");
    assert_unchanged(&app).await;
}

#[tokio::test]
async fn hostile_inputs_get_4xx_and_change_nothing() {
    // Default limits, as a deployed server has them.
    let app = common::spawn_app().await;
    app.table("s", "set").await;
    app.table("b", "bag").await;
    app.put("s", "k", json!({"v": 1})).await;
    app.put("b", "k", json!(1)).await;
    let ten_mb = vec![b'1'; 10 * 1024 * 1024];
    app.send(
        Method::PUT,
        "/v1/tables/s/entries/k",
        Some(ten_mb.clone()),
        &[],
    )
    .await
    .assert_error(413, "payload_too_large");
    app.send(Method::POST, "/v1/tables/s/entries", Some(ten_mb), &[])
        .await
        .assert_error(413, "payload_too_large");
    // 100,000 levels of nesting: parsed with a depth limit, no stack overflow.
    for open in [b'[', b'{'] {
        let body: Vec<u8> = if open == b'[' {
            [vec![b'['; 100_000], vec![b']'; 100_000]].concat()
        } else {
            std::iter::repeat_n(&b"{\"a\":"[..], 100_000)
                .flatten()
                .copied()
                .chain(std::iter::once(b'1'))
                .chain(std::iter::repeat_n(b'}', 100_000))
                .collect()
        };
        for (method, path) in [
            (Method::PUT, "/v1/tables/s/entries/deep"),
            (Method::PATCH, "/v1/tables/s/entries/k"),
            (Method::POST, "/v1/tables/s/entries"),
            (Method::POST, "/v1/tables"),
            (Method::POST, "/v1/tables/s/entries/k/counter"),
        ] {
            let r = app.send(method, path, Some(body.clone()), &[]).await;
            assert_eq!(r.status, 400, "{path}: {}", r.text);
        }
    }
    for path in [
        "/v1/tables/s/entries/%ZZ",
        "/v1/tables/s/entries/a%2",
        "/v1/tables/s/entries/%",
    ] {
        app.send(Method::PUT, path, Some(b"1".to_vec()), &[])
            .await
            .assert_error(400, "invalid_key");
    }
    app.send(Method::GET, "/v1/tables/s%G1/entries/k", None, &[])
        .await
        .assert_error(400, "invalid_name");
    for body in [
        json!({"name": "x", "max_entries": 1e30}),
        json!({"name": "x", "max_entries": 18446744073709551615u64}),
        json!({"name": "x", "default_ttl_ms": 315360000001u64}),
        json!({"name": "x", "auto_save_ms": 0, "persistence": "periodic"}),
        json!({"name": "x", "auto_save_ms": 86400001, "persistence": "periodic"}),
        json!({"name": "x", "origin": {"url": "http://127.0.0.1:1/{key}", "timeout_ms": 0}}),
    ] {
        app.create_table(body.clone())
            .await
            .assert_error(400, "invalid_argument");
    }
    for q in ["?ttl_ms=315360000001", "?ttl_ms=18446744073709551616"] {
        app.put_with("s", "k", json!(2), q, &[])
            .await
            .assert_error(400, "invalid_argument");
    }
    for tag in ["\"1\", garbage", "W/", "\"a\"b\""] {
        let r = app
            .send(
                Method::PUT,
                "/v1/tables/s/entries/k",
                Some(b"2".to_vec()),
                &[("if-match", tag)],
            )
            .await;
        assert_eq!(r.status, 400, "{tag}: {}", r.text);
    }
    // Still up, and nothing changed.
    assert_eq!(
        app.send(Method::GET, "/healthz", None, &[]).await.status,
        200
    );
    assert_eq!(app.get("s", "k").await.body["value"], json!({"v": 1}));
    assert_eq!(app.get("b", "k").await.body["values"], json!([1]));
    app.get("s", "deep")
        .await
        .assert_error(404, "key_not_found");
    assert_eq!(app.get_table("s").await.body["size"], 1);
    let tables = app.send(Method::GET, "/v1/tables", None, &[]).await;
    assert_eq!(tables.body["tables"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_repeated_member_anywhere_in_a_body_is_invalid_json() {
    let app = app_with_data().await;
    let cases: [(Method, &str, &str); 7] = [
        (
            Method::POST,
            "/v1/tables",
            r#"{"name":"t","type":"set","access":"private","access":"public"}"#,
        ),
        (Method::PUT, "/v1/tables/s/entries/k", r#"{"v":1,"v":2}"#),
        (
            Method::PUT,
            "/v1/tables/s/entries/k",
            r#"{"a":[{"x":1,"y":2,"x":3}]}"#,
        ),
        (Method::PATCH, "/v1/tables/s/entries/k", r#"{"v":2,"v":3}"#),
        (
            Method::POST,
            "/v1/tables/s/entries",
            r#"[{"key":"n","value":{"a":1,"a":1}}]"#,
        ),
        (
            Method::POST,
            "/v1/tables/s/entries/c/counter",
            r#"{"incr":1,"incr":5,"default":0}"#,
        ),
        (
            Method::POST,
            "/v1/tables/s/select",
            r#"{"match":{"key":"$k","key":"$j"}}"#,
        ),
    ];
    for (method, path, body) in cases {
        let reply = app
            .send(method.clone(), path, Some(body.as_bytes().to_vec()), &[])
            .await;
        reply.assert_error(400, "invalid_json");
        assert!(reply.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("appears twice"));
    }
    assert_unchanged(&app).await;
    assert_eq!(app.get("s", "c").await.status, 404);
}

#[tokio::test]
async fn a_repeated_member_in_an_import_line_is_invalid_import() {
    let app = app_with_data().await;
    let export = app.export_text("s").await;
    let object_line = export.lines().nth(1).unwrap();
    let doubled = object_line.replacen("{\"key\"", "{\"key\":\"x\",\"key\"", 1);
    let stream = export.replacen(object_line, &doubled, 1);
    let reply = app.import(stream, "?name=copy").await;
    reply.assert_error(400, "invalid_import");
    assert!(reply.body["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("line 2:"));
    assert_unchanged(&app).await;
}
