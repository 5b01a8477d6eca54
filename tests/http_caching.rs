//! `Cache-Control` on entry answers: `max-age` of the whole seconds of TTL
//! left, `no-cache` without a TTL and on 404s and 304s alike, and `public`
//! first on tables created with `"cache": "public"`; `Last-Modified` from
//! the last write (kept across restarts, the same on every cluster node)
//! and `If-Modified-Since` answered with 304.

mod common;

use serde_json::json;

use common::spawn_with_manual_clock;

fn cache_control(r: &common::Reply) -> String {
    r.headers
        .get("cache-control")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn entry_answers_say_how_long_a_cache_may_keep_them() {
    let app = spawn_with_manual_clock().await;
    assert_eq!(app.create_table(json!({"name": "t"})).await.status, 201);
    app.put_with("t", "short", json!(1), "?ttl_ms=10500", &[])
        .await;
    app.put("t", "forever", json!(2)).await;

    let r = app.get("t", "short").await;
    assert_eq!(r.status, 200);
    assert_eq!(cache_control(&r), "max-age=10");
    app.advance(1000);
    assert_eq!(cache_control(&app.get("t", "short").await), "max-age=9");
    app.advance(9000);
    // 500 ms left: rounded down.
    assert_eq!(cache_control(&app.get("t", "short").await), "max-age=0");

    assert_eq!(cache_control(&app.get("t", "forever").await), "no-cache");
    let r = app.get("t", "absent").await;
    assert_eq!(r.status, 404);
    assert_eq!(cache_control(&r), "no-cache");

    // A 304 carries the same directive as the full answer.
    let etag = app.get("t", "forever").await.headers["etag"].clone();
    let r = app
        .client
        .get(app.entry_url("t", "forever"))
        .header("if-none-match", etag)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["cache-control"], "no-cache");
}

#[tokio::test]
async fn public_tables_let_shared_caches_keep_their_answers() {
    let app = spawn_with_manual_clock().await;
    let r = app
        .create_table(json!({"name": "p", "cache": "public"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["cache"], "public");
    app.put_with("p", "k", json!(1), "?ttl_ms=60000", &[]).await;
    assert_eq!(
        cache_control(&app.get("p", "k").await),
        "public, max-age=60"
    );
    assert_eq!(
        cache_control(&app.get("p", "absent").await),
        "public, no-cache"
    );
    // Other tables say nothing of sharing; their info says `default`.
    let r = app.create_table(json!({"name": "d"})).await;
    assert_eq!(r.body["cache"], "default");
    // Only the two values exist.
    let r = app
        .create_table(json!({"name": "x", "cache": "private"}))
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
}

fn http_date(unix_seconds: u64) -> String {
    httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix_seconds))
}

#[tokio::test]
async fn last_modified_is_the_last_write_and_if_modified_since_answers_304() {
    let app = spawn_with_manual_clock().await;
    assert_eq!(app.create_table(json!({"name": "t"})).await.status, 201);
    // The manual clock starts at 1,700,000,000 s (plus 400 ms here).
    app.advance(400);
    app.put("t", "k", json!(1)).await;
    let written = http_date(1_700_000_000);
    assert_eq!(written, "Tue, 14 Nov 2023 22:13:20 GMT");
    app.advance(5000);
    let r = app.get("t", "k").await;
    assert_eq!(r.header("last-modified"), Some(written.as_str()));
    let etag = r.header("etag").unwrap().to_owned();
    let head = app
        .send(reqwest::Method::HEAD, &app.entry_path("t", "k"), None, &[])
        .await;
    assert_eq!(head.header("last-modified"), Some(written.as_str()));

    let get_if = |headers: Vec<(&'static str, String)>| {
        let app = &app;
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            app.send(reqwest::Method::GET, &app.entry_path("t", "k"), None, &h)
                .await
        }
    };
    // Not modified since the write, nor since any later time.
    for since in [1_700_000_000, 1_700_000_003] {
        let r = get_if(vec![("if-modified-since", http_date(since))]).await;
        assert_eq!(r.status, 304, "since {since}");
        assert_eq!(r.header("last-modified"), Some(written.as_str()));
        assert_eq!(r.header("etag"), Some(etag.as_str()));
        assert_eq!(r.text, "");
    }
    // Modified since a second before it.
    let r = get_if(vec![("if-modified-since", http_date(1_699_999_999))]).await;
    assert_eq!(r.status, 200);
    // If-None-Match wins when both are sent, either way.
    let r = get_if(vec![
        ("if-modified-since", http_date(1_700_000_003)),
        ("if-none-match", "\"999999\"".into()),
    ])
    .await;
    assert_eq!(r.status, 200);
    let r = get_if(vec![
        ("if-modified-since", http_date(1_699_000_000)),
        ("if-none-match", etag.clone()),
    ])
    .await;
    assert_eq!(r.status, 304);
    // A date that does not parse is ignored.
    let r = get_if(vec![("if-modified-since", "yesterday".into())]).await;
    assert_eq!(r.status, 200);

    // Every kind of write moves it: a PUT, a counter, a merge patch.
    app.put("t", "k", json!({"n": 1})).await;
    let after_put = http_date(1_700_000_005);
    assert_eq!(
        app.get("t", "k").await.header("last-modified"),
        Some(after_put.as_str())
    );
    let r = get_if(vec![("if-modified-since", written.clone())]).await;
    assert_eq!(r.status, 200);
    app.advance(2000);
    app.counter("t", "k", json!({"field": "n"})).await;
    let after_counter = http_date(1_700_000_007);
    assert_eq!(
        app.get("t", "k").await.header("last-modified"),
        Some(after_counter.as_str())
    );
    app.advance(2000);
    let r = app
        .send(
            reqwest::Method::PATCH,
            &app.entry_path("t", "k"),
            Some(br#"{"m":2}"#.to_vec()),
            &[],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        app.get("t", "k").await.header("last-modified"),
        Some(http_date(1_700_000_009).as_str())
    );
}

#[tokio::test]
async fn last_modified_survives_a_restart() {
    let app = common::spawn_app().await;
    let r = app
        .create_table(json!({"name": "t", "persistence": "sync"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    app.put("t", "k", json!(1)).await;
    let before = app.get("t", "k").await;
    let modified = before.header("last-modified").unwrap().to_owned();
    let app = common::spawn_on(app.stop().await).await;
    let after = app.get("t", "k").await;
    assert_eq!(after.header("last-modified"), Some(modified.as_str()));
    let r = app
        .send(
            reqwest::Method::GET,
            &app.entry_path("t", "k"),
            None,
            &[("if-modified-since", &modified)],
        )
        .await;
    assert_eq!(r.status, 304);
}

#[tokio::test]
async fn every_cluster_node_answers_the_same_last_modified() {
    let Some(app) = common::spawn_cluster_app().await else {
        return;
    };
    assert_eq!(app.create_table(json!({"name": "t"})).await.status, 201);
    app.put("t", "k", json!(1)).await;
    // Round robin over the three nodes, twice.
    let mut seen = Vec::new();
    for _ in 0..6 {
        let r = app.get("t", "k").await;
        assert_eq!(r.status, 200, "{}", r.text);
        seen.push(r.header("last-modified").unwrap_or_default().to_owned());
    }
    assert!(!seen[0].is_empty());
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    let r = app
        .send(
            reqwest::Method::GET,
            &app.entry_path("t", "k"),
            None,
            &[("if-modified-since", &seen[0])],
        )
        .await;
    assert_eq!(r.status, 304);
}
