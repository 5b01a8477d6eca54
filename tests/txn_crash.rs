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
//! On a cluster table the same runs through two nodes on one PostgreSQL:
//! writers on both, one node killed again and again; read through the
//! other, every group is whole and no acknowledged transaction is lost.
//!
//! The kill moments come from a seed, printed; `TXN_CRASH_SEED=N` replays.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
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
    write_until(client, base, table, writer, log, Arc::default()).await;
}

/// As [`write_until_dead`], also stopping once `stop` is set.
async fn write_until(
    client: reqwest::Client,
    base: String,
    table: String,
    writer: usize,
    log: Log,
    stop: Arc<AtomicBool>,
) {
    let url = format!("{base}/v1/tables/{table}/txn");
    while !stop.load(Ordering::SeqCst) {
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

/// Every key of the table, read with one scan (from PostgreSQL itself on a
/// cluster table: one statement, one snapshot).
async fn contents(client: &reqwest::Client, base: &str, table: &str) -> HashMap<String, u64> {
    let url = format!("{base}/v1/tables/{table}/entries?limit=10000&consistent=true");
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
            let at = format!("seed {seed} cycle {cycle}");
            check_groups(&found, &log, table, 0..WRITERS, table == "s", &at);
            checked_groups += WRITERS;
        }
    }
    assert_eq!(checked_groups, CYCLES * WRITERS * TABLES.len());
    let acked_total: u64 = log.lock().unwrap().values().map(|(_, a)| *a).sum();
    assert!(acked_total > 0, "no transaction was acknowledged");
    server.kill9();
}

/// Checks every group of `writers` in `found`: one number on all keys or
/// none, never one that was not sent, and (when `durable`) at least the
/// last acknowledged one.
fn check_groups(
    found: &HashMap<String, u64>,
    log: &Log,
    table: &str,
    writers: std::ops::Range<usize>,
    durable: bool,
    at: &str,
) {
    for w in writers {
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
            "{at}: table {table} writer {w} holds parts of several transactions: {values:?}"
        );
        if let Some(n) = first {
            assert!(n <= sent, "{at}: a number never sent: {n} > {sent}");
        }
        if durable {
            assert!(
                first.unwrap_or(0) >= acked,
                "{at}: writer {w} lost an acknowledged transaction: found {first:?}, \
                 acknowledged {acked}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_transactions_survive_a_killed_node_whole_or_not_at_all() {
    let Some(pg) = common::pg::PgServer::start() else {
        return;
    };
    let url = pg.create_db("larder").await;
    let seed: u64 = std::env::var("TXN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("cluster transaction crash seed: {seed} (replay with TXN_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let env = [("LARDER_CLUSTER_URL", url.as_str())];
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut victim = ChildServer::start_with(dir_a.path(), &env).await;
    let survivor = ChildServer::start_with(dir_b.path(), &env).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/tables", victim.base))
        .body(json!({"name": "c", "persistence": "cluster"}).to_string())
        .send()
        .await
        .expect("create");
    assert_eq!(r.status(), 201);
    let log: Log = Arc::default();
    for cycle in 0..CYCLES {
        let acked = |w: usize| {
            log.lock()
                .unwrap()
                .get(&("c".to_owned(), w))
                .map_or(0, |e| e.1)
        };
        let before: Vec<u64> = (0..2 * WRITERS).map(acked).collect();
        // Writers 0.. on the node to be killed, WRITERS.. on the other.
        let stop = Arc::new(AtomicBool::new(false));
        let mut doomed = Vec::new();
        let mut steady = Vec::new();
        for w in 0..2 * WRITERS {
            let on_victim = w < WRITERS;
            let base = if on_victim {
                &victim.base
            } else {
                &survivor.base
            };
            let task = tokio::spawn(write_until(
                client.clone(),
                base.clone(),
                "c".to_owned(),
                w,
                log.clone(),
                if on_victim {
                    Arc::default()
                } else {
                    stop.clone()
                },
            ));
            if on_victim {
                doomed.push(task);
            } else {
                steady.push(task);
            }
        }
        // Once every writer has had this cycle's first transaction
        // acknowledged, at a random moment after.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while (0..2 * WRITERS).any(|w| acked(w) <= before[w]) {
            assert!(
                std::time::Instant::now() < deadline,
                "transactions too slow"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..300))).await;
        victim.kill9();
        for w in doomed {
            w.await.expect("writer");
        }
        stop.store(true, Ordering::SeqCst);
        for w in steady {
            w.await.expect("writer");
        }

        let found = contents(&client, &survivor.base, "c").await;
        let at = format!("seed {seed} cycle {cycle}");
        check_groups(&found, &log, "c", 0..2 * WRITERS, true, &at);
        victim = ChildServer::start_with(dir_a.path(), &env).await;
    }
    let acked: Vec<u64> = (0..2 * WRITERS)
        .map(|w| {
            log.lock()
                .unwrap()
                .get(&("c".to_owned(), w))
                .map_or(0, |e| e.1)
        })
        .collect();
    assert!(
        acked.iter().all(|a| *a > 0),
        "every writer had transactions acknowledged: {acked:?}"
    );
    victim.kill9();
}
