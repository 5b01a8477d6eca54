//! `delete_all_objects` as one step: one revision and one event whatever
//! the table holds, no per-key dirty marks on durable tables (one "cleared"
//! mark instead, which survives a SIGKILL), memory given back in the
//! background, and an ordered_set whose index a clear left behind scans
//! correctly before and after it is reclaimed.

mod common;

use std::time::{Duration, Instant};

use common::child::ChildServer;
use common::{spawn_app, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

async fn fill(app: &TestApp, table: &str, n: usize, tag: &str) {
    let items: Vec<(String, Value)> = (0..n)
        .map(|i| {
            (
                format!("{tag}{i:06}"),
                json!({"i": i, "pad": "x".repeat(40)}),
            )
        })
        .collect();
    for chunk in items.chunks(2000) {
        app.bulk(table, chunk).await;
    }
}

async fn clear(app: &TestApp, table: &str) {
    let r = app
        .send(
            Method::DELETE,
            &format!("/v1/tables/{table}/entries"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
}

/// The revision a PUT gets, from its ETag.
async fn revision_of_a_put(app: &TestApp, table: &str) -> u64 {
    let r = app.put(table, "probe", json!(0)).await;
    r.header("etag")
        .and_then(|e| e.trim_matches('"').parse().ok())
        .expect("a numeric ETag")
}

#[tokio::test]
async fn a_clear_takes_one_revision_and_gives_its_memory_back_in_the_background() {
    let app = spawn_app().await;
    let baseline = app.metric("larder_memory_bytes{kind=\"tables\"}").await;
    for kind in ["set", "ordered_set", "bag"] {
        app.table(kind, kind).await;
        fill(&app, kind, 20_000, "k").await;
    }
    let full = app.metric("larder_memory_bytes{kind=\"tables\"}").await;
    assert!(full > baseline + 3.0 * 20_000.0 * 40.0, "{full}");
    for kind in ["set", "ordered_set", "bag"] {
        let before = revision_of_a_put(&app, kind).await;
        clear(&app, kind).await;
        let after = revision_of_a_put(&app, kind).await;
        assert_eq!(after, before + 2, "{kind}: the clear took one revision");
        let info = app.get_table(kind).await.body;
        assert_eq!(info["size"], 1, "{kind}: only the probe");
        assert_eq!(info["stats"]["deletes"], 20_001, "{kind}");
    }
    // What the clears took is freed by the reclaimer, not the request.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = app.metric("larder_memory_bytes{kind=\"tables\"}").await;
        if now < baseline + 100_000.0 {
            break;
        }
        assert!(Instant::now() < deadline, "memory stuck at {now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The ordered index holds only what the table holds.
    let keys: Vec<String> = app
        .scan_all("ordered_set", "")
        .await
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(keys, vec!["probe".to_string()]);
}

#[tokio::test]
async fn an_ordered_set_scans_right_while_its_cleared_index_is_reclaimed() {
    let app = spawn_app().await;
    app.table("o", "ordered_set").await;
    fill(&app, "o", 40_000, "a").await;
    clear(&app, "o").await;
    // Some keys come back at once, some new ones arrive; scans right away
    // (index entries of the clear may still be there) see exactly these.
    let mut wanted: Vec<(String, Value)> = Vec::new();
    for i in (0..40_000).step_by(997) {
        wanted.push((format!("a{i:06}"), json!(i)));
    }
    wanted.push(("zzz".into(), json!("new")));
    app.bulk("o", &wanted).await;
    let got = app.scan_all("o", "?limit=7").await;
    assert_eq!(got, wanted);
    let reversed = app.scan_all("o", "?limit=5&reverse=true").await;
    let mut backwards = wanted.clone();
    backwards.reverse();
    assert_eq!(reversed, backwards);
}

#[tokio::test]
async fn a_durable_clear_is_one_mark_and_survives_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path()).await;
    let client = reqwest::Client::new();
    let base = server.base.clone();
    for mode in ["sync", "periodic"] {
        let r = client
            .post(format!("{base}/v1/tables"))
            .json(&json!({"name": mode, "persistence": mode, "type": "ordered_set"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let items: Vec<Value> = (0..5000)
            .map(|i| json!({"key": format!("old{i:05}"), "value": i}))
            .collect();
        let r = client
            .post(format!("{base}/v1/tables/{mode}/entries"))
            .json(&items)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = client
            .post(format!("{base}/v1/tables/{mode}/sync"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = client
            .delete(format!("{base}/v1/tables/{mode}/entries"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
        let dirty = client
            .get(format!("{base}/v1/tables/{mode}"))
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()["dirty"]
            .clone();
        assert!(
            dirty.as_u64().is_some_and(|d| d < 10),
            "{mode}: a clear marks no key dirty ({dirty})"
        );
        let r = client
            .put(server.entry_url(mode, "new"))
            .body("1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let r = client
            .post(format!("{base}/v1/tables/{mode}/sync"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    server.kill9();
    let server = ChildServer::start(dir.path()).await;
    for mode in ["sync", "periodic"] {
        let page: Value = client
            .get(format!(
                "{}/v1/tables/{mode}/entries?limit=100",
                server.base
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            page["entries"],
            json!([{"key": "new", "value": 1}]),
            "{mode}: only what came after the clear"
        );
    }
}
