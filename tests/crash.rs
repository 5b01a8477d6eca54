//! Crash tests: a real `larder` process killed with SIGKILL (or stopped with
//! SIGTERM) under write load, restarted on the same data directory.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::child::ChildServer;
use serde_json::{json, Value};

async fn create(server: &ChildServer, body: Value) {
    let r = reqwest::Client::new()
        .post(format!("{}/v1/tables", server.base))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

async fn get(base: &str, url_path: &str) -> (u16, Value) {
    let r = reqwest::get(format!("{base}{url_path}")).await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls `cond` every few milliseconds until it holds (30 s at most).
async fn until(cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What clients saw acknowledged.
#[derive(Default)]
struct Acks {
    /// Per client: the last acknowledged value of its own key.
    last: Mutex<HashMap<usize, u64>>,
    /// Per client: whether a request was in flight when the server died.
    unanswered: Mutex<HashMap<usize, bool>>,
    /// Acknowledged increments of the shared counter.
    increments: AtomicU64,
    /// Every acknowledged distinct key.
    keys: Mutex<Vec<String>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sync_tables_lose_no_acknowledged_write_on_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path()).await;
    create(&server, json!({"name": "s", "persistence": "sync"})).await;
    let acks = Arc::new(Acks::default());
    let mut clients = Vec::new();
    const CLIENTS: usize = 16;
    for c in 0..CLIENTS {
        let acks = acks.clone();
        let own = server.entry_url("s", &format!("client{c}"));
        let counter = format!("{}/counter", server.entry_url("s", "hits"));
        let distinct = server.entry_url("s", "");
        clients.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 1u64.. {
                acks.unanswered.lock().unwrap().insert(c, true);
                let put = http.put(&own).body(i.to_string()).send().await;
                if !put.is_ok_and(|r| r.status().is_success()) {
                    return;
                }
                acks.last.lock().unwrap().insert(c, i);
                let inc = http.post(&counter).body(r#"{"default":0}"#).send().await;
                if !inc.is_ok_and(|r| r.status().is_success()) {
                    return;
                }
                acks.increments.fetch_add(1, Ordering::SeqCst);
                let key = format!("c{c}-{i}");
                let put = http
                    .put(format!("{distinct}{key}"))
                    .body("true")
                    .send()
                    .await;
                if !put.is_ok_and(|r| r.status().is_success()) {
                    return;
                }
                acks.keys.lock().unwrap().push(key);
                acks.unanswered.lock().unwrap().insert(c, false);
            }
        }));
    }
    // Kill in the middle of the load, once plenty has been acknowledged.
    until(|| acks.increments.load(Ordering::SeqCst) >= 600).await;
    server.kill9();
    for c in clients {
        c.await.unwrap();
    }

    let server = ChildServer::start(dir.path()).await;
    let base = server.base.clone();
    let last_acked = acks.last.lock().unwrap().clone();
    for (c, last) in last_acked {
        let (status, body) = get(&base, &format!("/v1/tables/s/entries/client{c}")).await;
        assert_eq!(status, 200);
        let stored = body["value"].as_u64().unwrap();
        // The latest acknowledged value, or the one in flight at the kill.
        assert!(
            stored == last || stored == last + 1,
            "client {c}: acked {last}, stored {stored}"
        );
    }
    let acked = acks.increments.load(Ordering::SeqCst);
    let (_, hits) = get(&base, "/v1/tables/s/entries/hits").await;
    let hits = hits["value"].as_u64().unwrap();
    // Every acknowledged increment is there; at most one per client was in
    // flight (applied and saved, but never acknowledged).
    assert!(
        hits >= acked && hits <= acked + CLIENTS as u64,
        "acked {acked}, stored {hits}"
    );
    let keys = acks.keys.lock().unwrap().clone();
    assert!(keys.len() >= 500);
    for key in keys {
        let (status, _) = get(&base, &format!("/v1/tables/s/entries/{key}")).await;
        assert_eq!(status, 200, "{key} was acknowledged but lost");
    }
}

/// Stated slack on top of `auto_save_ms` for the periodic bound: covers the
/// test's own timestamps and process scheduling on a loaded machine.
const SLACK_MS: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn periodic_tables_lose_at_most_auto_save_ms_of_writes_on_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path()).await;
    create(
        &server,
        json!({"name": "p", "persistence": "periodic", "auto_save_ms": 200}),
    )
    .await;
    // Several kills after different lengths of load, so they land at
    // different points of the save cycle; each restart checks its cycle.
    for (cycle, load_ms) in [700u64, 950, 1200].into_iter().enumerate() {
        let log: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..4 {
            let log = log.clone();
            let stop = stop.clone();
            let base = server.entry_url("p", "");
            writers.push(tokio::spawn(async move {
                let http = reqwest::Client::new();
                for i in 0u64.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let key = format!("c{cycle}-w{w}-{i:06}");
                    match http
                        .put(format!("{base}{key}"))
                        .body(i.to_string())
                        .send()
                        .await
                    {
                        Ok(r) if r.status().is_success() => {
                            log.lock().unwrap().push((key, Instant::now()))
                        }
                        _ => return,
                    }
                }
            }));
        }
        let started = Instant::now();
        until(|| started.elapsed() > Duration::from_millis(load_ms)).await;
        let killed_at = Instant::now();
        server.kill9();
        stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.await.unwrap();
        }

        server = ChildServer::start(dir.path()).await;
        let bound = Duration::from_millis(200 + SLACK_MS);
        let acked = log.lock().unwrap().clone();
        let must_survive: Vec<_> = acked
            .iter()
            .filter(|(_, at)| killed_at.duration_since(*at) > bound)
            .collect();
        assert!(
            must_survive.len() > 50,
            "cycle {cycle} wrote enough: {}",
            must_survive.len()
        );
        let mut lost = Vec::new();
        for (key, _) in &must_survive {
            let (status, _) = get(&server.base, &format!("/v1/tables/p/entries/{key}")).await;
            if status != 200 {
                lost.push(key.clone());
            }
        }
        assert!(
            lost.is_empty(),
            "cycle {cycle}: {} writes older than the bound were lost: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_under_write_load_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path()).await;
    // An hour-long auto_save: only the graceful stop can save these writes.
    create(
        &server,
        json!({"name": "t", "persistence": "periodic", "auto_save_ms": 3_600_000}),
    )
    .await;
    create(&server, json!({"name": "b", "type": "duplicate_bag", "persistence": "periodic", "auto_save_ms": 3_600_000})).await;
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let bag_acks = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..8 {
        let acked = acked.clone();
        let bag_acks = bag_acks.clone();
        let base = server.entry_url("t", "");
        let bag = server.entry_url("b", "k");
        writers.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0u64.. {
                let key = format!("w{w}-{i}");
                match http.put(format!("{base}{key}")).body("1").send().await {
                    Ok(r) if r.status().is_success() => acked.lock().unwrap().push(key),
                    _ => return,
                }
                match http.put(&bag).body(i.to_string()).send().await {
                    Ok(r) if r.status().is_success() => bag_acks.fetch_add(1, Ordering::SeqCst),
                    _ => return,
                };
            }
        }));
    }
    until(|| acked.lock().unwrap().len() >= 1000).await;
    let status = server.terminate();
    assert!(status.success(), "graceful stop exits 0: {status:?}");
    assert!(server.log_text().contains("durable tier flushed"));
    for w in writers {
        w.await.unwrap();
    }

    let server = ChildServer::start(dir.path()).await;
    let keys = acked.lock().unwrap().clone();
    for key in &keys {
        let (status, _) = get(&server.base, &format!("/v1/tables/t/entries/{key}")).await;
        assert_eq!(status, 200, "{key} was acknowledged but lost");
    }
    let (_, bag) = get(&server.base, "/v1/tables/b/entries/k").await;
    let stored = bag["values"].as_array().unwrap().len() as u64;
    let acked_bag = bag_acks.load(Ordering::SeqCst);
    assert!(
        stored >= acked_bag && stored <= acked_bag + 8,
        "acked {acked_bag}, stored {stored}"
    );
}
