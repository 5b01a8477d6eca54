//! `Cache-Control` on entry answers: `max-age` of the whole seconds of TTL
//! left, `no-cache` without a TTL and on 404s and 304s alike, and `public`
//! first on tables created with `"cache": "public"`.

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
