//! Exactly-once retries across crashes: concurrent clients send keyed
//! writes to a `sync` counter and to a `periodic` table while the server
//! is killed with SIGKILL again and again; every request is retried with
//! its key until it gets a 2xx, across restarts.
//!
//! Afterwards, with the server killed once more:
//! - the `sync` counter equals the number of distinct keys sent to it
//!   exactly (each applied once), and each of those keys is replayed with
//!   the answer it was first given;
//! - for each keyed PUT to the `periodic` table, its change and its record
//!   are both there or both gone: the entry exists exactly when a retry is
//!   answered as a replay (a record without its change, or a change
//!   without its record, would break this).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::child::ChildServer;
use serde_json::{json, Value};

const CLIENTS: usize = 8;
const CYCLES: usize = 8;

/// Sends a keyed request until it gets a 2xx (the server may be down or
/// restarting), giving up after a minute. The answer's body and whether it
/// was a replay.
async fn until_ok(
    client: &reqwest::Client,
    base: &Arc<Mutex<String>>,
    method: reqwest::Method,
    path: &str,
    body: &str,
    key: &str,
) -> (Value, bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let url = format!("{}{path}", base.lock().unwrap());
        let sent = client
            .request(method.clone(), url)
            .header("idempotency-key", key)
            .body(body.to_owned())
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        if let Ok(r) = sent {
            if r.status().is_success() {
                let replayed = r.headers().contains_key("idempotent-replayed");
                let body: Value = r.json().await.unwrap_or(Value::Null);
                return (body, replayed);
            }
        }
        assert!(Instant::now() < deadline, "{key} never got a 2xx");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keyed_writes_apply_once_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut server = ChildServer::start(dir.path()).await;
    for body in [
        json!({"name": "s", "persistence": "sync"}),
        json!({"name": "p", "persistence": "periodic", "auto_save_ms": 100}),
    ] {
        let r = client
            .post(format!("{}/v1/tables", server.base))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let base = Arc::new(Mutex::new(server.base.clone()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Counter keys and their first answers; PUT keys.
    let counted: Arc<Mutex<HashMap<String, Value>>> = Arc::default();
    let put: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
        let (counted, put) = (counted.clone(), put.clone());
        clients.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                let key = format!("c{c}-{n}");
                let (answer, _) = until_ok(
                    &client,
                    &base,
                    reqwest::Method::POST,
                    "/v1/tables/s/entries/n/counter",
                    r#"{"default":0}"#,
                    &key,
                )
                .await;
                counted.lock().unwrap().insert(key, answer);
                let key = format!("p{c}-{n}");
                let path = format!("/v1/tables/p/entries/{key}");
                until_ok(&client, &base, reqwest::Method::PUT, &path, "1", &key).await;
                put.lock().unwrap().push(key);
            }
        }));
    }
    for cycle in 0..CYCLES {
        tokio::time::sleep(Duration::from_millis(300 + 70 * cycle as u64)).await;
        server.kill9();
        server = ChildServer::start(dir.path()).await;
        *base.lock().unwrap() = server.base.clone();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    server.kill9();
    let server = ChildServer::start(dir.path()).await;
    *base.lock().unwrap() = server.base.clone();
    let counted = counted.lock().unwrap().clone();
    let r: Value = client
        .get(format!("{}/v1/tables/s/entries/n", server.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        r["value"].as_u64(),
        Some(counted.len() as u64),
        "the counter counts each of the {} keys once",
        counted.len()
    );
    for (key, first) in &counted {
        let (again, replayed) = until_ok(
            &client,
            &base,
            reqwest::Method::POST,
            "/v1/tables/s/entries/n/counter",
            r#"{"default":0}"#,
            key,
        )
        .await;
        assert!(replayed, "{key} was applied again");
        assert_eq!(&again, first, "{key} replayed another answer");
    }
    let put = put.lock().unwrap().clone();
    let (mut both, mut neither) = (0, 0);
    for key in &put {
        let path = format!("/v1/tables/p/entries/{key}");
        let exists = client
            .get(format!("{}{path}", server.base))
            .send()
            .await
            .unwrap()
            .status()
            == 200;
        let (_, replayed) = until_ok(&client, &base, reqwest::Method::PUT, &path, "1", key).await;
        assert_eq!(
            exists,
            replayed,
            "{key}: change {} but record {}",
            if exists { "kept" } else { "lost" },
            if replayed { "kept" } else { "lost" }
        );
        if exists {
            both += 1;
        } else {
            neither += 1;
        }
    }
    assert!(both > 0, "some periodic writes were saved ({neither} lost)");
}
