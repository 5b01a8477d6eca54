//! The crash loop: a real server under concurrent writers to `sync` and
//! `periodic` tables, with tables being created, dropped and re-created
//! meanwhile, is killed with SIGKILL at a random moment, restarted on the
//! same data directory and checked, cycle after cycle.
//!
//! Invariants checked after every restart:
//! - every acknowledged `sync` write is there, with its value or a later
//!   one that was sent (values of a key count up, so "later" is "larger");
//! - every `periodic` write acknowledged more than `auto_save_ms` (plus a
//!   stated slack) before the kill is there, or a later one;
//! - counters hold at least their acknowledged increments and at most the
//!   ones sent; a duplicate bag holds its values in order, a prefix of what
//!   was sent that covers what was acknowledged;
//! - a table whose create was acknowledged (and whose drop was not sent)
//!   exists, one whose drop was acknowledged (and no create sent since) does
//!   not, and no incarnation's data comes back in a later one;
//! - no value appears that was never sent.
//!
//! The run is seeded; the seed is printed and every failure names it.
//! `CRASH_LOOP_SEED=N cargo test --test crash_loop` replays a run.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::child::ChildServer;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{json, Value};

/// Kill-and-restart cycles per run.
const CYCLES: usize = 50;
/// `auto_save_ms` of the periodic tables.
const AUTO_SAVE_MS: u64 = 200;
/// Slack on the periodic bound: the test's own timestamps and scheduling on
/// a loaded two-core machine.
const SLACK_MS: u64 = 150;
/// Keys per writer.
const KEYS: u64 = 6;

/// One key written with values 1, 2, 3… by a single writer, in order.
#[derive(Debug, Default, Clone)]
struct KeyLog {
    /// Highest value sent.
    sent: u64,
    /// Highest value acknowledged.
    acked: u64,
    /// Acknowledgements of this cycle, for the periodic bound.
    acks: Vec<(u64, Instant)>,
    /// Value found on disk at the last restart (periodic tables).
    floor: u64,
}

/// A table that a churner creates, fills with one marker and drops.
#[derive(Debug, Clone)]
struct Churn {
    name: &'static str,
    persistence: &'static str,
    /// Generation of the current (or last) incarnation.
    generation: u64,
    exists: bool,
    marker_acked: bool,
    /// The operation in flight, if the server died during it.
    pending: Option<Op>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Create(u64),
    Marker(u64),
    Drop,
}

#[derive(Debug, Default)]
struct Model {
    sync: HashMap<String, KeyLog>,
    periodic: HashMap<String, KeyLog>,
    /// Counter key → (acknowledged increments, sent increments).
    counters: HashMap<String, (u64, u64)>,
    /// Bag key → log of values added.
    bags: HashMap<String, KeyLog>,
    churns: Vec<Churn>,
    acked_writes: u64,
}

type Shared = Arc<Mutex<Model>>;

async fn ok(resp: Result<reqwest::Response, reqwest::Error>) -> Option<u16> {
    resp.ok().map(|r| r.status().as_u16())
}

/// Writes 1, 2, 3… to its keys in turn until the server goes away.
async fn key_writer(model: Shared, base: String, table: &'static str, w: usize) {
    let http = reqwest::Client::new();
    for round in 0u64.. {
        let key = format!("w{w}-k{}", round % KEYS);
        let n = {
            let mut m = model.lock().unwrap();
            let map = if table == "p" {
                &mut m.periodic
            } else {
                &mut m.sync
            };
            let log = map.entry(key.clone()).or_default();
            log.sent += 1;
            log.sent
        };
        let url = format!("{base}/v1/tables/{table}/entries/{key}");
        match ok(http.put(&url).body(n.to_string()).send().await).await {
            Some(200 | 201) => {}
            _ => return,
        }
        let mut m = model.lock().unwrap();
        m.acked_writes += 1;
        let map = if table == "p" {
            &mut m.periodic
        } else {
            &mut m.sync
        };
        let log = map.get_mut(&key).expect("logged before sending");
        log.acked = n;
        log.acks.push((n, Instant::now()));
    }
}

/// Increments a counter and appends to a duplicate bag until the server goes away.
async fn counter_and_bag_writer(model: Shared, base: String, w: usize) {
    let http = reqwest::Client::new();
    let counter = format!("{base}/v1/tables/s/entries/ctr-{w}/counter");
    let bag_key = format!("bag-{w}");
    let bag = format!("{base}/v1/tables/b/entries/{bag_key}");
    loop {
        model
            .lock()
            .unwrap()
            .counters
            .entry(format!("ctr-{w}"))
            .or_default()
            .1 += 1;
        match ok(http.post(&counter).body(r#"{"default":0}"#).send().await).await {
            Some(200) => {}
            _ => return,
        }
        let n = {
            let mut m = model.lock().unwrap();
            m.acked_writes += 1;
            m.counters.get_mut(&format!("ctr-{w}")).unwrap().0 += 1;
            let log = m.bags.entry(bag_key.clone()).or_default();
            log.sent += 1;
            log.sent
        };
        match ok(http.put(&bag).body(n.to_string()).send().await).await {
            Some(200 | 201) => {}
            _ => return,
        }
        let mut m = model.lock().unwrap();
        m.acked_writes += 1;
        m.bags.get_mut(&bag_key).unwrap().acked = n;
    }
}

/// Creates, marks and drops its table over and over until the server goes away.
async fn churner(model: Shared, base: String, c: usize) {
    let http = reqwest::Client::new();
    loop {
        let churn = model.lock().unwrap().churns[c].clone();
        let op = if !churn.exists {
            Op::Create(churn.generation + 1)
        } else if !churn.marker_acked {
            Op::Marker(churn.generation)
        } else {
            Op::Drop
        };
        model.lock().unwrap().churns[c].pending = Some(op);
        let table = format!("{base}/v1/tables/{}", churn.name);
        let done = match op {
            Op::Create(_) => {
                let mut body = json!({"name": churn.name, "persistence": churn.persistence});
                if churn.persistence == "periodic" {
                    body["auto_save_ms"] = json!(AUTO_SAVE_MS);
                }
                let sent = http
                    .post(format!("{base}/v1/tables"))
                    .body(body.to_string())
                    .send()
                    .await;
                ok(sent).await == Some(201)
            }
            Op::Marker(g) => {
                let sent = http
                    .put(format!("{table}/entries/marker"))
                    .body(g.to_string())
                    .send()
                    .await;
                ok(sent).await == Some(201)
            }
            Op::Drop => ok(http.delete(&table).send().await).await == Some(204),
        };
        if !done {
            return;
        }
        let mut m = model.lock().unwrap();
        m.acked_writes += 1;
        let state = &mut m.churns[c];
        state.pending = None;
        match op {
            Op::Create(g) => {
                state.generation = g;
                state.exists = true;
                state.marker_acked = false;
            }
            Op::Marker(_) => state.marker_acked = true,
            Op::Drop => state.exists = false,
        }
    }
}

async fn get(http: &reqwest::Client, url: String) -> (u16, Value) {
    let r = http
        .get(url)
        .send()
        .await
        .expect("the restarted server answers");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Checks every invariant against the restarted server and resets the
/// model to what it found. Returns the number of checks made.
async fn verify(model: &Shared, base: &str, killed_at: Instant, ctx: &str) -> u64 {
    let http = reqwest::Client::new();
    let mut checks = 0;
    let sync: Vec<(String, KeyLog)> = model.lock().unwrap().sync.clone().into_iter().collect();
    for (key, log) in sync {
        let (status, body) = get(&http, format!("{base}/v1/tables/s/entries/{key}")).await;
        let stored = if status == 200 {
            body["value"].as_u64().unwrap()
        } else {
            0
        };
        assert!(
            stored >= log.acked && stored <= log.sent,
            "{ctx}: sync key {key}: acknowledged {}, sent {}, stored {stored}",
            log.acked,
            log.sent
        );
        checks += 1;
    }
    let bound = Duration::from_millis(AUTO_SAVE_MS + SLACK_MS);
    let periodic: Vec<(String, KeyLog)> =
        model.lock().unwrap().periodic.clone().into_iter().collect();
    for (key, log) in periodic {
        let (status, body) = get(&http, format!("{base}/v1/tables/p/entries/{key}")).await;
        let stored = if status == 200 {
            body["value"].as_u64().unwrap()
        } else {
            0
        };
        let must = log
            .acks
            .iter()
            .filter(|(_, at)| killed_at.saturating_duration_since(*at) > bound)
            .map(|(n, _)| *n)
            .max()
            .unwrap_or(0)
            .max(log.floor);
        assert!(
            stored >= must && stored <= log.sent,
            "{ctx}: periodic key {key}: must keep {must}, sent {}, stored {stored}",
            log.sent
        );
        let mut m = model.lock().unwrap();
        let entry = m.periodic.get_mut(&key).unwrap();
        entry.floor = stored;
        entry.acks.clear();
        checks += 1;
    }
    let counters: Vec<(String, (u64, u64))> =
        model.lock().unwrap().counters.clone().into_iter().collect();
    for (key, (acked, sent)) in counters {
        let (status, body) = get(&http, format!("{base}/v1/tables/s/entries/{key}")).await;
        let stored = if status == 200 {
            body["value"].as_u64().unwrap()
        } else {
            0
        };
        assert!(
            stored >= acked && stored <= sent,
            "{ctx}: counter {key}: acknowledged {acked}, sent {sent}, stored {stored}"
        );
        // What is stored is the truth from here on.
        model.lock().unwrap().counters.insert(key, (stored, stored));
        checks += 1;
    }
    let bags: Vec<(String, KeyLog)> = model.lock().unwrap().bags.clone().into_iter().collect();
    for (key, log) in bags {
        let (status, body) = get(&http, format!("{base}/v1/tables/b/entries/{key}")).await;
        let values: Vec<u64> = if status == 200 {
            body["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        } else {
            Vec::new()
        };
        let m = values.len() as u64;
        assert!(
            values.iter().copied().eq(1..=m) && m >= log.acked && m <= log.sent,
            "{ctx}: bag {key}: acknowledged 1..={}, sent 1..={}, stored {values:?}",
            log.acked,
            log.sent
        );
        let mut model = model.lock().unwrap();
        let entry = model.bags.get_mut(&key).unwrap();
        entry.sent = m;
        entry.acked = m;
        checks += 1;
    }
    let churns = model.lock().unwrap().churns.clone();
    for (c, churn) in churns.into_iter().enumerate() {
        let (status, _) = get(&http, format!("{base}/v1/tables/{}", churn.name)).await;
        let exists = status == 200;
        let marker = if exists {
            let (s, body) = get(
                &http,
                format!("{base}/v1/tables/{}/entries/marker", churn.name),
            )
            .await;
            (s == 200).then(|| body["value"].as_u64().unwrap())
        } else {
            None
        };
        let name = churn.name;
        let gen = churn.generation;
        let sync = churn.persistence == "sync";
        match churn.pending {
            None => {
                assert_eq!(
                    exists, churn.exists,
                    "{ctx}: table {name} (generation {gen}) existence"
                );
                if exists && churn.marker_acked && sync {
                    assert_eq!(
                        marker,
                        Some(gen),
                        "{ctx}: table {name}: acknowledged marker"
                    );
                }
            }
            Some(Op::Create(g)) => {
                if exists {
                    assert_eq!(
                        marker, None,
                        "{ctx}: table {name}: generation {g} got old data"
                    );
                }
            }
            Some(Op::Marker(_)) => assert!(exists, "{ctx}: table {name}: acknowledged create lost"),
            Some(Op::Drop) => {
                if exists && churn.marker_acked && sync {
                    assert_eq!(
                        marker,
                        Some(gen),
                        "{ctx}: table {name}: acknowledged marker"
                    );
                }
            }
        }
        if let Some(m) = marker {
            let expected = match churn.pending {
                Some(Op::Create(g)) => g,
                _ => gen,
            };
            assert_eq!(
                m, expected,
                "{ctx}: table {name}: data of another generation"
            );
        }
        let mut model = model.lock().unwrap();
        let state = &mut model.churns[c];
        if let Some(Op::Create(g)) = state.pending {
            if exists {
                state.generation = g;
            }
        }
        state.exists = exists;
        state.marker_acked = marker.is_some();
        state.pending = None;
        checks += 1;
    }
    checks
}

async fn create(base: &str, body: Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/tables"))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_at_random_moments_never_loses_an_acknowledged_write() {
    let seed: u64 = std::env::var("CRASH_LOOP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("crash loop seed: {seed} (replay with CRASH_LOOP_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = ChildServer::start(dir.path()).await;
    create(&server.base, json!({"name": "s", "persistence": "sync"})).await;
    create(
        &server.base,
        json!({"name": "b", "type": "duplicate_bag", "persistence": "sync"}),
    )
    .await;
    create(
        &server.base,
        json!({"name": "p", "persistence": "periodic", "auto_save_ms": AUTO_SAVE_MS}),
    )
    .await;
    let model: Shared = Arc::new(Mutex::new(Model {
        churns: vec![
            Churn {
                name: "c-sync",
                persistence: "sync",
                generation: 0,
                exists: false,
                marker_acked: false,
                pending: None,
            },
            Churn {
                name: "c-periodic",
                persistence: "periodic",
                generation: 0,
                exists: false,
                marker_acked: false,
                pending: None,
            },
        ],
        ..Model::default()
    }));
    let started = Instant::now();
    let mut checks = 0;
    for cycle in 0..CYCLES {
        let ctx = format!("seed {seed}, cycle {cycle}");
        let base = server.base.clone();
        let mut tasks = Vec::new();
        for w in 0..3 {
            tasks.push(tokio::spawn(key_writer(
                model.clone(),
                base.clone(),
                "s",
                w,
            )));
            tasks.push(tokio::spawn(key_writer(
                model.clone(),
                base.clone(),
                "p",
                w,
            )));
        }
        for w in 0..2 {
            tasks.push(tokio::spawn(counter_and_bag_writer(
                model.clone(),
                base.clone(),
                w,
            )));
        }
        for c in 0..2 {
            tasks.push(tokio::spawn(churner(model.clone(), base.clone(), c)));
        }
        // The kill lands at a random moment of the load: the waiting here
        // is the experiment, not a wait for something to happen.
        tokio::time::sleep(Duration::from_millis(rng.random_range(30..400))).await;
        let killed_at = Instant::now();
        server.kill9();
        for t in tasks {
            t.await.unwrap();
        }
        server = ChildServer::start(dir.path()).await;
        checks += verify(&model, &server.base, killed_at, &ctx).await;
    }
    let acked = model.lock().unwrap().acked_writes;
    eprintln!(
        "crash loop: {CYCLES} cycles in {:.1} s, {acked} acknowledged writes, {checks} keys and tables checked after restarts, 0 lost",
        started.elapsed().as_secs_f64()
    );
    assert!(
        acked > (CYCLES as u64) * 20,
        "too little load: {acked} writes"
    );
}
