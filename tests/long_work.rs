//! Long work is bounded: select and scan pages never pass
//! `--max-response-bytes` (a single result over it is 422
//! `result_too_large` with a cursor past it), multi-get answers neither,
//! at most `--max-long-requests` run at once (others wait until their
//! deadline, then 503), and a select that runs out of time answers with
//! what it has and a cursor that resumes where it stopped.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{spawn_with, TestApp};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;

const LIMIT: usize = 64 * 1024;

async fn select(app: &TestApp, table: &str, body: Value) -> common::Reply {
    app.send(
        Method::POST,
        &format!("/v1/tables/{table}/select"),
        Some(body.to_string().into_bytes()),
        &[],
    )
    .await
}

async fn fill(app: &TestApp, table: &str, n: usize, pad: usize) {
    let items: Vec<(String, Value)> = (0..n)
        .map(|i| (format!("k{i:06}"), json!({"i": i, "pad": "x".repeat(pad)})))
        .collect();
    for chunk in items.chunks((512 * 1024 / (pad + 40)).max(1)) {
        app.bulk(table, chunk).await;
    }
}

#[tokio::test]
async fn select_and_scan_pages_stay_under_the_byte_limit() {
    let app = spawn_with(|c| {
        c.max_response_bytes = LIMIT as u64;
        c.max_body_bytes = 1 << 20;
    })
    .await;
    for kind in ["set", "ordered_set"] {
        app.table(kind, kind).await;
        fill(&app, kind, 60, 5_000).await;
        // Select: every object exactly once, over pages that each fit.
        let mut seen = BTreeSet::new();
        let mut cursor = Value::Null;
        let mut pages = 0;
        loop {
            let r = select(&app, kind, json!({"limit": 1000, "cursor": cursor})).await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert!(r.text.len() <= LIMIT, "{kind}: page of {}", r.text.len());
            for item in r.body["results"].as_array().unwrap() {
                assert!(seen.insert(item["key"].as_str().unwrap().to_owned()));
            }
            pages += 1;
            cursor = r.body["next_cursor"].clone();
            if cursor.is_null() {
                break;
            }
        }
        assert_eq!(seen.len(), 60, "{kind}");
        assert!(pages >= 5, "{kind}: {pages} pages");
        // Scans the same.
        let mut query = "?limit=1000".to_owned();
        let mut scanned = 0;
        loop {
            let r = app.scan(kind, &query).await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert!(
                r.text.len() <= LIMIT,
                "{kind}: scan page of {}",
                r.text.len()
            );
            scanned += r.body["entries"].as_array().unwrap().len();
            match r.body["next_cursor"].as_str() {
                Some(c) => query = format!("?limit=1000&cursor={c}"),
                None => break,
            }
        }
        assert_eq!(scanned, 60, "{kind}");
    }
    // A multi-get over the limit is refused rather than built.
    let keys: Vec<String> = (0..60).map(|i| format!("k{i:06}")).collect();
    let r = app
        .send(
            Method::POST,
            "/v1/tables/set/lookup",
            Some(json!({ "keys": keys }).to_string().into_bytes()),
            &[],
        )
        .await;
    r.assert_error(422, "result_too_large");
}

#[tokio::test]
async fn a_single_result_over_the_limit_is_422_with_a_cursor_past_it() {
    let app = spawn_with(|c| c.max_body_bytes = 1 << 20).await;
    app.table("t", "ordered_set").await;
    for (key, pad) in [("a", 10), ("b", 30_000), ("c", 10)] {
        app.put("t", key, json!({"pad": "y".repeat(pad)})).await;
    }
    // 900 copies of a 30 KB object: 27 MB of results from one object.
    let template = Value::Array(vec![json!("$_"); 900]);
    let spec =
        |cursor: Value| json!({"match": {"value": "$v"}, "return": template, "cursor": cursor});
    let first = select(&app, "t", spec(Value::Null)).await;
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.body["results"].as_array().unwrap().len(), 1, "a only");
    let cursor = first.body["next_cursor"].clone();
    assert!(cursor.is_string());
    let big = select(&app, "t", spec(cursor)).await;
    big.assert_error(422, "result_too_large");
    assert_eq!(big.body["error"]["key"], "b");
    let past = big.body["error"]["next_cursor"].clone();
    assert!(past.is_string(), "{}", big.text);
    let rest = select(&app, "t", spec(past)).await;
    assert_eq!(rest.status, 200);
    let results = rest.body["results"].as_array().unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0][0]["key"], "c");
    assert!(rest.body["next_cursor"].is_null());
}

#[tokio::test]
async fn long_requests_past_the_slots_wait_then_get_503() {
    let app = spawn_with(|c| {
        c.max_long_requests = Some(1);
        c.request_timeout_ms = 400;
        c.max_body_bytes = 1 << 20;
    })
    .await;
    app.table("t", "set").await;
    fill(&app, "t", 2_000, 2_000).await;
    // An export that nobody reads holds the one slot.
    let mut stalled = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(
        &mut stalled,
        b"GET /v1/tables/t/export HTTP/1.1\r\nHost: larder\r\n\r\n",
    )
    .await
    .unwrap();
    let mut first = [0u8; 16];
    stalled.read_exact(&mut first).await.unwrap();
    assert!(first.starts_with(b"HTTP/1.1 200"));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while app.metric("larder_long_requests_running").await < 1.0 {
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shed = select(&app, "t", json!({"limit": 1})).await;
    shed.assert_error(503, "unavailable");
    assert!(shed.header("retry-after").is_some());
    assert!(app.metric("larder_long_requests_shed_total").await >= 1.0);
    // Point reads are not long work.
    assert_eq!(app.get("t", "k000001").await.status, 200);
    drop(stalled);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let r = select(&app, "t", json!({"limit": 1})).await;
        if r.status == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{}", r.text);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_select_out_of_time_answers_what_it_has_and_resumes() {
    let _serial = common::gate::exclusive().await;
    let app = spawn_with(|c| {
        c.request_timeout_ms = 300;
        c.max_body_bytes = 1 << 20;
    })
    .await;
    app.table("t", "set").await;
    let n = 20_000;
    fill(&app, "t", n, 20).await;
    let spec = |cursor: Value| {
        json!({"match": {"value": {"i": "$i"}}, "where": ["==", ["rem", "$i", 2], 0],
               "return": "$i", "limit": 10000, "cursor": cursor})
    };
    // Each step of 256 objects takes 40 ms: the walk runs out of time
    // after a few steps, far from the 10,000 results it asks for.
    fail::cfg("select-step", "sleep(40)").unwrap();
    let first = select(&app, "t", spec(Value::Null)).await;
    fail::remove("select-step");
    assert_eq!(first.status, 200, "{}", first.text);
    let partial = first.body["results"].as_array().unwrap().len();
    assert!(partial < 5000, "stopped early: {partial} results");
    assert!(first.body["next_cursor"].is_string(), "{}", first.text);
    // Resuming from its cursor gives everything else, exactly once.
    let mut seen: BTreeSet<u64> = first.body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let mut cursor = first.body["next_cursor"].clone();
    while !cursor.is_null() {
        let r = select(&app, "t", spec(cursor)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        for v in r.body["results"].as_array().unwrap() {
            assert!(seen.insert(v.as_u64().unwrap()), "{v} twice");
        }
        cursor = r.body["next_cursor"].clone();
    }
    assert_eq!(seen.len(), n / 2, "every even number exactly once");
}

/// The server process's resident memory, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

#[tokio::test]
async fn huge_templates_cost_the_process_no_more_than_the_page_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::child::ChildServer::start(dir.path()).await;
    let client = reqwest::Client::new();
    let base = server.base.clone();
    client
        .post(format!("{base}/v1/tables"))
        .json(&json!({"name": "t"}))
        .send()
        .await
        .unwrap();
    let r = client
        .put(format!("{base}/v1/tables/t/entries/big"))
        .json(&json!({"pad": "q".repeat(30_000)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let pid = server.child.id();
    let before = rss_bytes(pid);
    let spec = json!({"return": vec![json!("$_"); 900]});
    let mut peak = before;
    for _ in 0..3 {
        let mut running = Vec::new();
        for _ in 0..4 {
            let client = client.clone();
            let url = format!("{base}/v1/tables/t/select");
            let spec = spec.clone();
            running.push(tokio::spawn(async move {
                let r = client.post(url).json(&spec).send().await.unwrap();
                let status = r.status();
                let body: Value = r.json().await.unwrap();
                (status, body)
            }));
        }
        for r in running {
            let (status, body) = r.await.unwrap();
            assert_eq!(status, 422, "{body}");
            assert_eq!(body["error"]["code"], "result_too_large");
        }
        peak = peak.max(rss_bytes(pid));
    }
    // Each request stops at the 8 MiB page limit: four at once may hold
    // four such buffers, never the 27 MB each result would take.
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 48 << 20,
        "RSS grew by {} MB under 12 huge selects",
        grown >> 20
    );
}
