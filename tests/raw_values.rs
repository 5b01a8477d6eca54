//! Raw values (`"values": "any"`): bytes that are not JSON round-trip byte
//! for byte through PUT and GET, show as `{"$bytes", "content_type"}` in
//! every JSON view (scans, lookup, select, transactions, watch, export),
//! come back from an import and a restart, and JSON keeps working as it did.

mod common;

use common::sse::Stream;
use common::{spawn_app, spawn_cluster_app, spawn_on, Reply, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

/// Bytes no JSON text holds: NUL, invalid UTF-8, quotes, a backslash.
const AWKWARD: &[u8] = &[0, 1, 0xff, 0xfe, b'"', b'\\', 0xc3, 0x28, b'\n', 0x80, 0];

fn b64(bytes: &[u8]) -> String {
    base64_simd::STANDARD.encode_to_string(bytes)
}

async fn any_table(app: &TestApp, name: &str, persistence: &str) {
    let r = app
        .create_table(json!({"name": name, "values": "any", "persistence": persistence}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["values"], "any");
}

async fn put_raw(app: &TestApp, table: &str, key: &str, bytes: &[u8], ct: &str) -> Reply {
    app.send(
        Method::PUT,
        &app.entry_path(table, key),
        Some(bytes.to_vec()),
        &[("content-type", ct)],
    )
    .await
}

/// An entry GET's status, content type and body bytes.
async fn get_bytes(app: &TestApp, table: &str, key: &str) -> (u16, String, Vec<u8>) {
    let r = app
        .request(Method::GET, &app.entry_path(table, key))
        .send()
        .await
        .expect("get");
    let status = r.status().as_u16();
    let ct = r.headers()["content-type"].to_str().unwrap().to_owned();
    (status, ct, r.bytes().await.expect("body").to_vec())
}

#[tokio::test]
async fn raw_bytes_round_trip_through_put_and_get() {
    let app = spawn_app().await;
    any_table(&app, "blobs", "none").await;
    let r = put_raw(&app, "blobs", "k", AWKWARD, "application/octet-stream").await;
    assert_eq!(r.status, 201, "{}", r.text);
    let etag = r.header("etag").unwrap().to_owned();

    let resp = app
        .client
        .get(app.entry_url("blobs", "k"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    assert_eq!(resp.headers()["etag"], etag.as_str());
    assert_eq!(resp.headers()["x-cache"], "HIT");
    assert_eq!(resp.headers()["cache-control"], "no-cache");
    assert_eq!(resp.bytes().await.unwrap().as_ref(), AWKWARD);

    // The content type comes back as it was sent, parameters and all;
    // an empty body is a value too.
    let html = b"<p>caf\xc3\xa9</p>";
    put_raw(&app, "blobs", "h", html, "text/html; charset=utf-8").await;
    assert_eq!(
        get_bytes(&app, "blobs", "h").await,
        (200, "text/html; charset=utf-8".into(), html.to_vec())
    );
    put_raw(&app, "blobs", "e", b"", "image/png").await;
    assert_eq!(
        get_bytes(&app, "blobs", "e").await,
        (200, "image/png".into(), Vec::new())
    );

    // If-None-Match still answers 304, and HEAD sees the key.
    let r = app
        .send(
            Method::GET,
            &app.entry_path("blobs", "k"),
            None,
            &[("if-none-match", &etag)],
        )
        .await;
    assert_eq!(r.status, 304);
    let r = app
        .send(Method::HEAD, &app.entry_path("blobs", "k"), None, &[])
        .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn json_bodies_stay_json_on_an_any_table() {
    let app = spawn_app().await;
    any_table(&app, "t", "none").await;
    // What `curl -d` sends, what `fetch` sends with a JSON type, and no
    // type at all: JSON.
    for (key, ct) in [
        ("form", Some("application/x-www-form-urlencoded")),
        ("json", Some("application/json; charset=utf-8")),
        ("problem", Some("application/problem+json")),
        ("none", None),
    ] {
        let headers: Vec<(&str, &str)> = ct.map(|c| ("content-type", c)).into_iter().collect();
        let path = app.entry_path("t", key);
        let r = app
            .send(Method::PUT, &path, Some(br#"{"a":1}"#.to_vec()), &headers)
            .await;
        assert_eq!(r.status, 201, "{key}: {}", r.text);
        let r = app.get("t", key).await;
        assert_eq!(r.body["value"], json!({"a": 1}), "{key}");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    // JSON sent as text/plain is text here...
    put_raw(&app, "t", "text", br#"{"a":1}"#, "text/plain").await;
    assert_eq!(
        get_bytes(&app, "t", "text").await,
        (200, "text/plain".into(), br#"{"a":1}"#.to_vec())
    );
    // ...and JSON on a table that keeps JSON only, as it always was.
    app.table("plain", "set").await;
    assert_eq!(app.get_table("plain").await.body["values"], "json");
    put_raw(&app, "plain", "k", br#"{"a":1}"#, "text/plain").await;
    assert_eq!(app.get("plain", "k").await.body["value"], json!({"a": 1}));
    let r = put_raw(&app, "plain", "bin", AWKWARD, "application/octet-stream").await;
    r.assert_error(400, "invalid_json");
    // The raw form on a json table is an ordinary object.
    let form = json!({"$bytes": "not base64!", "content_type": "x/y"});
    assert_eq!(app.put("plain", "o", form.clone()).await.status, 201);
    assert_eq!(app.get("plain", "o").await.body["value"], form);
}

#[tokio::test]
async fn the_json_form_writes_bytes_and_bad_forms_change_nothing() {
    let app = spawn_app().await;
    any_table(&app, "t", "none").await;
    let r = app
        .put(
            "t",
            "k",
            json!({"$bytes": b64(AWKWARD), "content_type": "image/gif"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(
        get_bytes(&app, "t", "k").await,
        (200, "image/gif".into(), AWKWARD.to_vec())
    );
    // Without a type: application/octet-stream.
    app.put("t", "d", json!({"$bytes": b64(b"hi")})).await;
    assert_eq!(
        get_bytes(&app, "t", "d").await,
        (200, "application/octet-stream".into(), b"hi".to_vec())
    );

    for bad in [
        json!({"$bytes": "not base64!"}),
        json!({"$bytes": 5}),
        json!({"$bytes": "aGk=", "extra": 1}),
        json!({"$bytes": "aGk=", "content_type": 7}),
        json!({"$bytes": "aGk=", "content_type": ""}),
    ] {
        let r = app.put("t", "k", bad.clone()).await;
        r.assert_error(400, "invalid_argument");
        let r = app
            .send(
                Method::POST,
                "/v1/tables/t/entries",
                Some(serde_json::to_vec(&json!([{"key": "n", "value": bad}])).unwrap()),
                &[],
            )
            .await;
        r.assert_error(400, "invalid_argument");
        let r = app
            .send(
                Method::POST,
                "/v1/tables/t/txn",
                Some(
                    serde_json::to_vec(&json!({"then": [{"op": "put", "key": "n", "value": bad}]}))
                        .unwrap(),
                ),
                &[],
            )
            .await;
        r.assert_error(400, "invalid_argument");
        assert!(r.text.contains("then[0]"), "{}", r.text);
    }
    assert_eq!(
        get_bytes(&app, "t", "k").await,
        (200, "image/gif".into(), AWKWARD.to_vec())
    );
    assert_eq!(app.get("t", "n").await.status, 404);

    // Counters and merge patches do not apply to bytes.
    let r = app.counter("t", "k", json!({"incr": 1})).await;
    r.assert_error(409, "not_a_counter");
    let r = app
        .counter("t", "k", json!({"incr": 1, "field": "$bytes"}))
        .await;
    r.assert_error(409, "not_a_counter");
    let r = app
        .send(
            Method::PATCH,
            &app.entry_path("t", "k"),
            Some(br#"{"a":1}"#.to_vec()),
            &[("content-type", "application/merge-patch+json")],
        )
        .await;
    r.assert_error(409, "not_an_object");
    assert_eq!(
        get_bytes(&app, "t", "k").await,
        (200, "image/gif".into(), AWKWARD.to_vec())
    );

    // Bag tables keep JSON only.
    let r = app
        .create_table(json!({"name": "b", "type": "bag", "values": "any"}))
        .await;
    r.assert_error(400, "invalid_argument");
    let r = app
        .create_table(json!({"name": "b", "values": "bytes"}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
}

#[tokio::test]
async fn json_views_show_raw_values_in_base64() {
    let app = spawn_app().await;
    any_table(&app, "t", "none").await;
    let mut watch = Stream::open(&app.client, &app.url("/v1/tables/t/watch"), None).await;
    put_raw(&app, "t", "k", AWKWARD, "application/x-thing").await;
    let form = json!({"$bytes": b64(AWKWARD), "content_type": "application/x-thing"});

    let event = watch.event().await.expect("an event");
    assert_eq!(event.event, "put");
    assert_eq!(event.data["value"], form);

    let scan = app.scan("t", "").await;
    assert_eq!(scan.body["entries"][0]["value"], form, "{}", scan.text);
    let lookup = app
        .send(
            Method::POST,
            "/v1/tables/t/lookup",
            Some(br#"{"keys":["k"]}"#.to_vec()),
            &[],
        )
        .await;
    assert_eq!(lookup.body["entries"][0]["value"], form, "{}", lookup.text);
    let select = app
        .send(
            Method::POST,
            "/v1/tables/t/select",
            Some(br#"{"match":{"key":"$k","value":"$v"},"return":"$v"}"#.to_vec()),
            &[],
        )
        .await;
    assert_eq!(select.body["results"][0], form, "{}", select.text);

    // A transaction reads the form, compares with it, and its keyed
    // replay answers the same bytes.
    let body = serde_json::to_vec(&json!({
        "if": [{"key": "k", "value": form}],
        "then": [{"op": "get", "key": "k"}]
    }))
    .unwrap();
    let keyed = [("idempotency-key", "txn-1")];
    let first = app
        .send(Method::POST, "/v1/tables/t/txn", Some(body.clone()), &keyed)
        .await;
    assert_eq!(first.body["succeeded"], true, "{}", first.text);
    assert_eq!(first.body["results"][0]["value"], form);
    let again = app
        .send(Method::POST, "/v1/tables/t/txn", Some(body), &keyed)
        .await;
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(again.text, first.text);
}

#[tokio::test]
async fn raw_values_survive_export_import_and_restart() {
    let app = spawn_app().await;
    any_table(&app, "t", "sync").await;
    put_raw(&app, "t", "bin", AWKWARD, "application/octet-stream").await;
    put_raw(&app, "t", "txt", b"plain text", "text/plain").await;
    app.put("t", "json", json!([1, "two"])).await;

    let stream = app.export_text("t").await;
    assert!(stream.contains(&b64(AWKWARD)), "{stream}");
    let r = app.import(stream, "?name=copy").await;
    assert_eq!(r.status, 201, "{}", r.text);
    for table in ["t", "copy"] {
        assert_eq!(
            get_bytes(&app, table, "bin").await,
            (200, "application/octet-stream".into(), AWKWARD.to_vec())
        );
    }
    // An import with a bad raw form into an any table is refused whole.
    let bad = "{\"name\":\"worse\",\"type\":\"set\",\"values\":\"any\"}\n\
               {\"key\":\"k\",\"value\":{\"$bytes\":\"!!\"}}\n";
    let r = app.import(bad.to_owned(), "").await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(app.get_table("worse").await.status, 404);

    let app = spawn_on(app.stop().await).await;
    assert_eq!(app.get_table("t").await.body["values"], "any");
    assert_eq!(
        get_bytes(&app, "t", "bin").await,
        (200, "application/octet-stream".into(), AWKWARD.to_vec())
    );
    assert_eq!(
        get_bytes(&app, "t", "txt").await,
        (200, "text/plain".into(), b"plain text".to_vec())
    );
    assert_eq!(app.get("t", "json").await.body["value"], json!([1, "two"]));
}

#[tokio::test]
async fn raw_values_cross_cluster_nodes() {
    let Some(app) = spawn_cluster_app().await else {
        return;
    };
    any_table(&app, "t", "cluster").await;
    // Through the node round robin: written on one, read on the others.
    put_raw(&app, "t", "bin", AWKWARD, "image/webp").await;
    for _ in 0..3 {
        assert_eq!(
            get_bytes(&app, "t", "bin").await,
            (200, "image/webp".into(), AWKWARD.to_vec())
        );
    }
    let r = app
        .send(
            Method::PATCH,
            &app.entry_path("t", "bin"),
            Some(br#"{"a":1}"#.to_vec()),
            &[],
        )
        .await;
    r.assert_error(409, "not_an_object");
    let r: Value = app.scan("t", "").await.body;
    assert_eq!(r["entries"][0]["value"]["content_type"], "image/webp");
}

#[tokio::test]
async fn an_origins_bytes_are_cached_raw_on_an_any_table() {
    use axum::http::header;
    let origin = axum::Router::new().route(
        "/img/{key}",
        axum::routing::get(|| async { ([(header::CONTENT_TYPE, "image/png")], AWKWARD) }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, origin).await });
    let app = common::spawn_with(|c| c.origin_allow = vec!["127.0.0.1:*".into()]).await;
    for (name, values) in [("raw", "any"), ("json", "json")] {
        let r = app
            .create_table(json!({"name": name, "values": values,
                "origin": {"url": format!("http://{host}/img/{{key}}")}}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    assert_eq!(
        get_bytes(&app, "raw", "a").await,
        (200, "image/png".into(), AWKWARD.to_vec())
    );
    let form = json!({"$bytes": b64(AWKWARD), "content_type": "image/png"});
    assert_eq!(app.scan("raw", "").await.body["entries"][0]["value"], form);
    // A table that keeps JSON only still refuses what is not JSON.
    let r = app.get("json", "a").await;
    r.assert_error(502, "origin_error");
}
