//! Transactions across SIGKILL: writers each own a group of 120 keys (more
//! than one write-back batch) and write the same number to every key of
//! their group in one transaction, again and again, on a `sync` and a
//! `periodic` table; a keyed counter transaction moves two counters
//! together. The real server is killed with SIGKILL at varied moments and
//! restarted on the same data directory. After every restart each group
//! holds one number on all of its keys or none of them, never a mix (all
//! of a transaction or none of it), and on the `sync` table that number
//! is at least the last acknowledged one.
//!
//! The kill moments come from a seed, printed; `TXN_CRASH_SEED=N` replays.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::child::ChildServer;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};

const CYCLES: usize = 6;
const WRITERS: usize = 3;
const GROUP: usize = 120;
const TABLES: [&str; 2] = ["s", "p"];

/// Per (table, writer): the highest number sent and acknowledged.
type Log = Arc<Mutex<HashMap<(String, usize), (u64, u64)>>>;

fn group_txn(writer: usize, n: u64) -> Value {
    let then: Vec<Value> = (0..GROUP)
        .map(|i| json!({"op": "put", "key": format!("w{writer}-{i:03}"), "value": n}))
        .collect();
    json!({ "then": then })
}

async fn write_until_dead(
    client: reqwest::Client,
    base: String,
    table: String,
    writer: usize,
    log: Log,
) {
    let url = format!("{base}/v1/tables/{table}/txn");
    loop {
        let n = {
            let mut l = log.lock().unwrap();
            let e = l.entry((table.clone(), writer)).or_default();
            e.0 += 1;
            e.0
        };
        let sent = client
            .post(&url)
            .body(group_txn(writer, n).to_string())
            .send()
            .await;
        match sent {
            Ok(r) if r.status() == 200 => {
                let mut l = log.lock().unwrap();
                let e = l.entry((table.clone(), writer)).or_default();
                e.1 = e.1.max(n);
            }
            Ok(r) => panic!("a transaction answered {}", r.status()),
            Err(_) => return, // the server died
        }
    }
}

/// Every key of the table, read with one scan.
async fn contents(client: &reqwest::Client, base: &str, table: &str) -> HashMap<String, u64> {
    let url = format!("{base}/v1/tables/{table}/entries?limit=10000");
    let body: Value = client
        .get(&url)
        .send()
        .await
        .expect("scan")
        .json()
        .await
        .expect("scan JSON");
    assert!(body["next_cursor"].is_null(), "one page holds the table");
    body["entries"]
        .as_array()
        .expect("entries")
        .iter()
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_owned(),
                e["value"].as_u64().expect("a number"),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_transaction_survives_a_crash_whole_or_not_at_all() {
    let seed: u64 = std::env::var("TXN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("transaction crash seed: {seed} (replay with TXN_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().expect("temp dir");
    let client = reqwest::Client::new();
    let mut server = ChildServer::start(dir.path()).await;
    for (name, body) in [
        (
            "s",
            json!({"name": "s", "type": "set", "persistence": "sync"}),
        ),
        (
            "p",
            json!({"name": "p", "type": "set", "persistence": "periodic", "auto_save_ms": 100}),
        ),
    ] {
        let r = client
            .post(format!("{}/v1/tables", server.base))
            .body(body.to_string())
            .send()
            .await
            .expect("create");
        assert_eq!(r.status(), 201, "table {name}");
    }
    let log: Log = Arc::default();
    let mut checked_groups = 0;
    for cycle in 0..CYCLES {
        let mut writers = Vec::new();
        for table in TABLES {
            for w in 0..WRITERS {
                writers.push(tokio::spawn(write_until_dead(
                    client.clone(),
                    server.base.clone(),
                    table.to_owned(),
                    w,
                    log.clone(),
                )));
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        server.kill9();
        for w in writers {
            w.await.expect("writer");
        }
        server = ChildServer::start(dir.path()).await;
        for table in TABLES {
            let found = contents(&client, &server.base, table).await;
            for w in 0..WRITERS {
                let (sent, acked) = log
                    .lock()
                    .unwrap()
                    .get(&(table.to_owned(), w))
                    .copied()
                    .unwrap_or_default();
                let values: Vec<Option<u64>> = (0..GROUP)
                    .map(|i| found.get(&format!("w{w}-{i:03}")).copied())
                    .collect();
                let first = values[0];
                assert!(
                    values.iter().all(|v| *v == first),
                    "seed {seed} cycle {cycle}: table {table} writer {w} holds parts of \
                     several transactions: {values:?}"
                );
                if let Some(n) = first {
                    assert!(n <= sent, "seed {seed}: a number never sent: {n} > {sent}");
                }
                if table == "s" {
                    assert!(
                        first.unwrap_or(0) >= acked,
                        "seed {seed} cycle {cycle}: writer {w} lost an acknowledged \
                         sync transaction: found {first:?}, acknowledged {acked}"
                    );
                }
                checked_groups += 1;
            }
        }
    }
    assert_eq!(checked_groups, CYCLES * WRITERS * TABLES.len());
    let acked_total: u64 = log.lock().unwrap().values().map(|(_, a)| *a).sum();
    assert!(acked_total > 0, "no transaction was acknowledged");
    server.kill9();
}
