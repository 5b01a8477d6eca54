//! Cluster tables: three larder nodes against one real PostgreSQL.
//!
//! Every test starts its own PostgreSQL (see `common::pg`) and skips, with
//! a printed reason, only when no PostgreSQL binaries are installed.

mod common;

use std::time::{Duration, Instant};

use common::model::{key, op, value, Model, Op, Outcome};
use common::pg::PgServer;
use common::{spawn_with, Reply, TestApp};
use larder::config::Config;
use larder::store::TableType;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use reqwest::Method;
use serde_json::{json, Value};

/// Starts PostgreSQL and `n` nodes pointed at a fresh database.
async fn cluster(n: usize) -> Option<(PgServer, Vec<TestApp>)> {
    cluster_with(n, |_| {}).await
}

/// Like `cluster`, with `tweak` applied to every node's configuration.
async fn cluster_with(n: usize, tweak: impl Fn(&mut Config)) -> Option<(PgServer, Vec<TestApp>)> {
    let pg = PgServer::start()?;
    let url = pg.create_db("larder").await;
    let mut nodes = Vec::new();
    for _ in 0..n {
        let url = url.clone();
        nodes.push(
            spawn_with(|c| {
                c.cluster_url = Some(url);
                c.cluster_poll_ms = 2;
                tweak(c);
            })
            .await,
        );
    }
    Some((pg, nodes))
}

async fn create(node: &TestApp, name: &str, kind: &str) {
    let r = node
        .create_table(
            json!({"name": name, "type": kind, "persistence": "cluster", "access": "public"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
}

/// `GET` of an entry read from PostgreSQL.
async fn get_consistent(node: &TestApp, table: &str, key: &str) -> Reply {
    node.send(
        Method::GET,
        &format!(
            "/v1/tables/{}/entries/{}?consistent=true",
            common::enc(table),
            common::enc(key)
        ),
        None,
        &[],
    )
    .await
}

#[tokio::test]
async fn cluster_tables_need_the_flag() {
    let node = common::spawn_app().await;
    let r = node
        .create_table(json!({"name": "c", "persistence": "cluster"}))
        .await;
    r.assert_error(400, "invalid_argument");
    assert!(r.text.contains("--cluster-url"), "{}", r.text);
}

#[tokio::test]
async fn a_table_created_on_one_node_is_used_on_all() {
    let Some((_pg, nodes)) = cluster(3).await else {
        return;
    };
    create(&nodes[0], "shared", "set").await;
    let r = nodes[1].put("shared", "k", json!({"v": 1})).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let etag = r.header("etag").expect("etag").to_owned();
    for node in &nodes {
        let r = get_consistent(node, "shared", "k").await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["value"], json!({"v": 1}));
        assert_eq!(r.header("etag"), Some(etag.as_str()), "ETags agree");
    }
    // The writer reads its own write from its hot copy at once.
    let r = nodes[1].get("shared", "k").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-cache"), Some("HIT"));
    // Names are one namespace.
    let r = nodes[2].create_table(json!({"name": "shared"})).await;
    r.assert_error(409, "table_exists");
    let r = nodes[2]
        .create_table(json!({"name": "shared", "persistence": "cluster"}))
        .await;
    r.assert_error(409, "table_exists");
    // Table info is table-wide.
    let info = nodes[2].get_table("shared").await;
    assert_eq!(info.status, 200, "{}", info.text);
    assert_eq!(info.body["persistence"], "cluster");
    assert_eq!(info.body["size"], 1);
    assert_eq!(info.body["stats"]["inserts"], 1);
    // A drop reaches every node.
    let r = nodes[0]
        .send(Method::DELETE, "/v1/tables/shared", None, &[])
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = nodes[2].get("shared", "k").await;
        if r.status == 404 && r.code() == "table_not_found" {
            break;
        }
        assert!(Instant::now() < deadline, "drop not seen: {}", r.text);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn counters_from_every_node_are_exact() {
    let Some((_pg, nodes)) = cluster(3).await else {
        return;
    };
    create(&nodes[0], "hits", "set").await;
    let per_client = 50;
    let clients_per_node = 8;
    let mut tasks = Vec::new();
    for node in &nodes {
        for c in 0..clients_per_node {
            let client = node.client.clone();
            let url = format!("{}/counter", node.entry_url("hits", "n"));
            let other = format!("{}/counter", node.entry_url("hits", &format!("k{c}")));
            tasks.push(tokio::spawn(async move {
                for _ in 0..per_client {
                    for u in [&url, &other] {
                        let r = client
                            .post(u)
                            .body(r#"{"incr":1,"default":0}"#)
                            .send()
                            .await
                            .expect("counter");
                        assert_eq!(r.status(), 200);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("client task");
    }
    let total = (nodes.len() * clients_per_node * per_client) as i64;
    for node in &nodes {
        let r = get_consistent(node, "hits", "n").await;
        assert_eq!(r.body["value"], json!(total), "{}", r.text);
    }
    for c in 0..clients_per_node {
        let r = get_consistent(&nodes[0], "hits", &format!("k{c}")).await;
        assert_eq!(r.body["value"], json!(nodes.len() * per_client));
    }
    // Within the staleness bound every node's plain read agrees too.
    for node in &nodes {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let r = node.get("hits", "n").await;
            if r.body["value"] == json!(total) {
                break;
            }
            assert!(Instant::now() < deadline, "stale: {}", r.text);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let info = nodes[1].get_table("hits").await;
    assert_eq!(info.body["size"], json!(1 + clients_per_node));
}

#[tokio::test]
async fn insert_new_and_compare_and_swap_have_one_winner_across_nodes() {
    let Some((_pg, nodes)) = cluster(3).await else {
        return;
    };
    create(&nodes[0], "race", "set").await;
    for round in 0..10 {
        let key = format!("k{round}");
        let statuses = race(&nodes, &key, "if-none-match", "*").await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 201).count(),
            1,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 412).count(),
            23,
            "{statuses:?}"
        );

        let etag = get_consistent(&nodes[0], "race", &key)
            .await
            .header("etag")
            .expect("etag")
            .to_owned();
        let statuses = race(&nodes, &key, "if-match", &etag).await;
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 412).count(),
            23,
            "{statuses:?}"
        );
    }
}

/// 24 concurrent conditional PUTs of `key` in table `race`, spread over
/// the nodes; their statuses.
async fn race(nodes: &[TestApp], key: &str, header: &'static str, value: &str) -> Vec<u16> {
    let mut tasks = Vec::new();
    for i in 0..24 {
        let node = &nodes[i % nodes.len()];
        let request = node
            .client
            .put(node.entry_url("race", key))
            .header(header, value)
            .body(format!("{i}"));
        tasks.push(tokio::spawn(async move {
            request.send().await.expect("put").status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.expect("task"));
    }
    statuses
}

/// One random operation, as a request.
fn random_op(
    rng: &mut u64,
    kind: &str,
) -> (Method, String, Option<String>, Vec<(&'static str, String)>) {
    let mut next = |n: u64| {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng % n
    };
    let key = format!("k{}", next(6));
    let value = json!({"n": next(3)}).to_string();
    let e = format!("/entries/{key}");
    match next(10) {
        0..=3 => (Method::PUT, e, Some(value), vec![]),
        4 => (
            Method::PUT,
            e,
            Some(value),
            vec![("if-none-match", "*".to_owned())],
        ),
        5 => (Method::DELETE, e, None, vec![]),
        6 => (
            Method::POST,
            format!("{e}/delete_object"),
            Some(value),
            vec![],
        ),
        7 => (Method::POST, format!("{e}/take"), None, vec![]),
        8 if kind == "set" || kind == "ordered_set" => (
            Method::POST,
            format!("{e}/counter"),
            Some(r#"{"incr":2,"default":1,"field":"n"}"#.into()),
            vec![],
        ),
        8 => (
            Method::POST,
            "/entries".into(),
            Some(format!(
                r#"[{{"key":"{key}","value":{value}}},{{"key":"b","value":1}}]"#
            )),
            vec![],
        ),
        _ => (Method::PATCH, e, Some(r#"{"m":true}"#.into()), vec![]),
    }
}

/// The parts of a reply both tables must agree on: status, error code and
/// body without ETags and versions.
fn comparable(r: &Reply) -> (u16, Value) {
    (r.status.as_u16(), r.body.clone())
}

#[tokio::test]
async fn random_operations_through_random_nodes_match_a_local_table() {
    let Some((_pg, nodes)) = cluster(3).await else {
        return;
    };
    for kind in ["set", "ordered_set", "bag", "duplicate_bag"] {
        let cluster_table = format!("c_{kind}");
        let local_table = format!("l_{kind}");
        create(&nodes[0], &cluster_table, kind).await;
        let r = nodes[0]
            .create_table(json!({"name": local_table, "type": kind}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
        let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ kind.len() as u64;
        for step in 0..300 {
            let (method, path, body, headers) = random_op(&mut rng, kind);
            let node = &nodes[(rng % 3) as usize];
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let on_cluster = node
                .send(
                    method.clone(),
                    &format!("/v1/tables/{cluster_table}{path}"),
                    body.clone().map(String::into_bytes),
                    &headers,
                )
                .await;
            let on_local = nodes[0]
                .send(
                    method.clone(),
                    &format!("/v1/tables/{local_table}{path}"),
                    body.clone().map(String::into_bytes),
                    &headers,
                )
                .await;
            assert_eq!(
                comparable(&on_cluster),
                comparable(&on_local),
                "{kind} step {step}: {method} {path} {body:?}"
            );
            // Every few steps, a full comparison through another node.
            if step % 25 == 0 {
                let reader = &nodes[((rng >> 3) % 3) as usize];
                let c = reader
                    .scan_all(&cluster_table, "?consistent=true&limit=2")
                    .await;
                let l = nodes[0].scan_all(&local_table, "?limit=2").await;
                let sorted = |mut v: Vec<(String, Value)>| {
                    v.sort_by(|a, b| (&a.0, a.1.to_string()).cmp(&(&b.0, b.1.to_string())));
                    v
                };
                if kind == "ordered_set" {
                    assert_eq!(c, l, "{kind} step {step}: scans differ");
                } else {
                    assert_eq!(sorted(c), sorted(l), "{kind} step {step}: scans differ");
                }
                for k in 0..6 {
                    let key = format!("k{k}");
                    let c = get_consistent(reader, &cluster_table, &key).await;
                    let l = nodes[0].get(&local_table, &key).await;
                    assert_eq!(c.status, l.status, "{kind} {key}");
                    assert_eq!(c.body["value"], l.body["value"], "{kind} {key}");
                    assert_eq!(c.body["values"], l.body["values"], "{kind} {key}");
                }
                let ci = reader.get_table(&cluster_table).await.body;
                let li = nodes[0].get_table(&local_table).await.body;
                assert_eq!(ci["size"], li["size"], "{kind} step {step}: size");
                assert_eq!(
                    ci["stats"]["inserts"], li["stats"]["inserts"],
                    "{kind} inserts"
                );
                assert_eq!(
                    ci["stats"]["deletes"], li["stats"]["deletes"],
                    "{kind} deletes"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_unreachable_database_is_503_for_cluster_tables_only_and_recovers() {
    let Some((pg, nodes)) = cluster(2).await else {
        return;
    };
    create(&nodes[0], "c", "set").await;
    nodes[0].table("local", "set").await;
    let r = nodes[0].put("c", "k", json!(1)).await;
    assert_eq!(r.status, 201);
    pg.stop();
    let r = nodes[1].put("c", "k", json!(2)).await;
    r.assert_error(503, "unavailable");
    assert!(r.header("retry-after").is_some());
    // Local tables are unaffected.
    let r = nodes[0].put("local", "k", json!(1)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    // Past the staleness bound no hot copy is served.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = nodes[0].get("c", "k").await;
        if r.status == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "hot copy served too long: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ready = nodes[0].send(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(ready.body["cluster"], "unavailable", "{}", ready.text);
    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = nodes[1].put("c", "k", json!(3)).await;
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {}", r.text);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked = Instant::now();
    // Node 0 held 1 in its hot copy. It may answer 1 only to a read that
    // began within the staleness bound of the acknowledgement of 3. The
    // node checks the bound in whole milliseconds of its real-time clock,
    // this test on its monotonic one; the two may differ by a fraction of
    // a millisecond over the bound (clock slewing), hence one of slack.
    let bound = Duration::from_millis(larder::config::Config::defaults().cluster_staleness_ms + 1);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let sent = Instant::now();
        let r = nodes[0].get("c", "k").await;
        if r.status == 200 && r.body["value"] == json!(3) {
            break;
        }
        if r.status == 200 {
            assert!(
                sent < acked + bound,
                "stale read {}ms after the write was acknowledged",
                (sent - acked).as_millis()
            );
        }
        assert!(Instant::now() < deadline, "no recovery: {}", r.text);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn expiry_is_counted_once_across_nodes() {
    let Some((_pg, nodes)) = cluster(3).await else {
        return;
    };
    create(&nodes[0], "ttl", "set").await;
    for i in 0..30 {
        let node = &nodes[i % 3];
        let r = node
            .put_with("ttl", &format!("k{i}"), json!(i), "?ttl_ms=300", &[])
            .await;
        assert_eq!(r.status, 201);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = nodes[2].get_table("ttl").await.body;
        if info["stats"]["expired"] == json!(30) {
            assert_eq!(info["size"], json!(0));
            break;
        }
        assert!(Instant::now() < deadline, "not swept: {info}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in &nodes {
        assert_eq!(node.get("ttl", "k1").await.status, 404);
    }
    // Nothing is counted twice however long the sweepers keep running.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let info = nodes[0].get_table("ttl").await.body;
    assert_eq!(info["stats"]["expired"], json!(30));
}

/// A node in a child process, on the cluster's database, to be killed.
async fn child_node(pg: &PgServer, dir: &std::path::Path) -> common::child::ChildServer {
    let url = pg.url("larder");
    common::child::ChildServer::start_with(
        dir,
        &[
            ("LARDER_CLUSTER_URL", url.as_str()),
            ("LARDER_CLUSTER_POLL_MS", "2"),
        ],
    )
    .await
}

/// Kills `victim` with SIGKILL once `ready()` holds, then waits for the
/// `writers` loading it to stop.
async fn kill_when(
    victim: &mut common::child::ChildServer,
    ready: impl Fn() -> bool,
    writers: Vec<tokio::task::JoinHandle<()>>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "writes too slow");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    victim.kill9();
    for w in writers {
        w.await.expect("writer");
    }
}

#[tokio::test]
async fn a_node_killed_under_write_load_loses_no_acknowledged_write() {
    let Some((_pg, nodes)) = cluster(1).await else {
        return;
    };
    create(&nodes[0], "acks", "set").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut victim = child_node(&_pg, dir.path()).await;
    // Writers on the child record what it acknowledged, until it dies.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let client = reqwest::Client::new();
        let base = victim.entry_url("acks", "");
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("w{w}-{i}");
                let sent = client
                    .put(format!("{base}{key}"))
                    .body(format!("{i}"))
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status() == 201 => acked.lock().unwrap().push((key, i)),
                    _ => return,
                }
            }
        }));
    }
    // Kill once a few hundred writes were acknowledged.
    kill_when(&mut victim, || acked.lock().unwrap().len() >= 300, writers).await;
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 300);
    // Every acknowledged write reads back through the surviving node.
    let all = nodes[0].scan_all("acks", "?limit=1000").await;
    let stored: std::collections::HashMap<String, Value> = all.into_iter().collect();
    for (key, i) in &acked {
        assert_eq!(
            stored.get(key),
            Some(&json!(i)),
            "lost acknowledged write {key}"
        );
    }
}

#[tokio::test]
async fn a_node_cut_off_from_the_database_converges_when_it_is_back() {
    let Some((pg, nodes)) = cluster(2).await else {
        return;
    };
    create(&nodes[0], "conv", "set").await;
    for i in 0..20 {
        let r = nodes[1].put("conv", &format!("k{i}"), json!(i)).await;
        assert_eq!(r.status, 201);
        // Node 1 caches its own writes; node 0 reads them into its copy.
        assert_eq!(nodes[0].get("conv", &format!("k{i}")).await.status, 200);
    }
    // Cut every connection of every node (what a network blip or a
    // database failover does); notifications would be lost here.
    let admin = pg.client("postgres").await;
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = 'larder' AND pid <> pg_backend_pid()",
            &[],
        )
        .await
        .expect("terminate");
    // Writes resume through node 1 (its pool reconnects).
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..20 {
        loop {
            let r = nodes[1].put("conv", &format!("k{i}"), json!(i + 100)).await;
            if r.status == 200 {
                break;
            }
            assert!(Instant::now() < deadline, "no reconnect: {}", r.text);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Node 0's plain reads converge on every new value.
    for i in 0..20 {
        loop {
            let r = nodes[0].get("conv", &format!("k{i}")).await;
            if r.status == 200 && r.body["value"] == json!(i + 100) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "k{i} never converged: {}",
                r.text
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

#[tokio::test]
async fn max_entries_holds_for_the_whole_table_and_metrics_show_the_tier() {
    let Some((_pg, nodes)) = cluster(2).await else {
        return;
    };
    for (name, eviction) in [("full", "none"), ("lru", "lru")] {
        let r = nodes[0]
            .create_table(
                json!({"name": name, "persistence": "cluster", "access": "public",
                                 "max_entries": 5, "eviction": eviction}),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    for i in 0..5 {
        let r = nodes[i % 2].put("full", &format!("k{i}"), json!(i)).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    nodes[1]
        .put("full", "k5", json!(5))
        .await
        .assert_error(507, "table_full");
    // Replacing an existing key does not grow the table.
    assert_eq!(nodes[1].put("full", "k0", json!(9)).await.status, 200);
    for i in 0..8 {
        let r = nodes[i % 2].put("lru", &format!("k{i}"), json!(i)).await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    let info = nodes[1].get_table("lru").await.body;
    assert_eq!(info["size"], json!(5), "{info}");
    assert_eq!(info["stats"]["evicted"], json!(3), "{info}");
    for i in 0..3 {
        let r = get_consistent(&nodes[0], "lru", &format!("k{i}")).await;
        assert_eq!(r.status, 404, "k{i} should have been evicted first");
    }
    assert!(nodes[0].metric("larder_cluster_reachable").await == 1.0);
    assert!(nodes[0].metric("larder_cluster_hot_bytes").await > 0.0);
    let lag = nodes[0].metric("larder_cluster_log_lag_seconds").await;
    assert!(lag.is_finite() && lag >= 0.0, "lag {lag}");
}

/// The error codes the reference model names, as the model spells them.
fn model_code(r: &Reply) -> &'static str {
    match r.code() {
        "key_not_found" => "key_not_found",
        "precondition_failed" => "precondition_failed",
        "not_a_counter" => "not_a_counter",
        "wrong_table_type" => "wrong_table_type",
        "overflow" => "overflow",
        _ => "other",
    }
}

/// The objects of a lookup or take reply: `value` on sets, `values` on bags.
fn objects_of(r: &Reply) -> Vec<Value> {
    match r.body["values"].as_array() {
        Some(values) => values.clone(),
        None => vec![r.body["value"].clone()],
    }
}

/// Runs one model operation on a cluster table through `node` over HTTP,
/// reading from PostgreSQL, and says what happened in the model's terms.
async fn run_model_op(node: &TestApp, table: &str, op: &Op) -> Outcome {
    let entry = |k: u8| format!("/v1/tables/{table}/entries/{}", key(k));
    let body = |v: u8| Some(value(v).to_string().into_bytes());
    let (r, ok) = match op {
        Op::Insert(k, v) => {
            let r = node.send(Method::PUT, &entry(*k), body(*v), &[]).await;
            let created = r.status == 201;
            (r, Outcome::Created(created))
        }
        Op::InsertNew(k, v) => {
            let headers = [("if-none-match", "*")];
            let r = node.send(Method::PUT, &entry(*k), body(*v), &headers).await;
            (r, Outcome::Created(true))
        }
        Op::Delete(k) => (
            node.send(Method::DELETE, &entry(*k), None, &[]).await,
            Outcome::Ok,
        ),
        Op::DeleteObject(k, v) => {
            let path = format!("{}/delete_object", entry(*k));
            (
                node.send(Method::POST, &path, body(*v), &[]).await,
                Outcome::Ok,
            )
        }
        Op::Take(k) => {
            let path = format!("{}/take", entry(*k));
            let r = node.send(Method::POST, &path, None, &[]).await;
            if r.status == 404 && r.code() == "key_not_found" {
                return Outcome::Found(None);
            }
            let found = Outcome::Found(Some(objects_of(&r)));
            (r, found)
        }
        Op::Lookup(k) => {
            let path = format!("{}?consistent=true", entry(*k));
            let r = node.send(Method::GET, &path, None, &[]).await;
            if r.status == 404 && r.code() == "key_not_found" {
                return Outcome::Found(None);
            }
            let found = Outcome::Found(Some(objects_of(&r)));
            (r, found)
        }
        Op::Member(k) => {
            let path = format!("{}?consistent=true", entry(*k));
            let r = node.send(Method::HEAD, &path, None, &[]).await;
            assert!(r.status == 200 || r.status == 404, "HEAD: {}", r.status);
            return Outcome::Member(r.status == 200);
        }
        Op::Counter(k, incr, default) => {
            let path = format!("{}/counter", entry(*k));
            let op = match default {
                Some(d) => json!({"incr": incr, "default": d}),
                None => json!({"incr": incr}),
            };
            let r = node
                .send(Method::POST, &path, Some(op.to_string().into_bytes()), &[])
                .await;
            let n = r.body["value"].as_i64().unwrap_or(i64::MIN);
            (r, Outcome::Counter(n))
        }
    };
    if r.status.is_success() {
        ok
    } else {
        Outcome::Err(model_code(&r))
    }
}

/// The property suite of `tests/model.rs`, pointed at cluster tables: each
/// operation of a random sequence goes to a randomly chosen node, and every
/// answer, the final scan and the size must be what the reference model
/// says.
#[test]
fn cluster_tables_through_random_nodes_match_the_model() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let Some((_pg, nodes)) = rt.block_on(cluster(3)) else {
        return;
    };
    let tables = std::sync::atomic::AtomicUsize::new(0);
    for kind in [
        TableType::Set,
        TableType::OrderedSet,
        TableType::Bag,
        TableType::DuplicateBag,
    ] {
        let mut runner = TestRunner::new(ProptestConfig {
            cases: 24,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let ops = prop::collection::vec((op(), 0usize..3), 1..40);
        let result = runner.run(&ops, |ops| {
            let n = tables.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let table = format!("m{n}");
            rt.block_on(check_cluster_case(&nodes, &table, kind, &ops))
        });
        if let Err(e) = result {
            panic!("{kind:?}: {e}");
        }
    }
}

async fn check_cluster_case(
    nodes: &[TestApp],
    table: &str,
    kind: TableType,
    ops: &[(Op, usize)],
) -> Result<(), TestCaseError> {
    let type_name = serde_json::to_value(kind).expect("type name");
    create(&nodes[0], table, type_name.as_str().expect("type name")).await;
    let mut model = Model::new(kind);
    for (step, (op, node)) in ops.iter().enumerate() {
        let want = model.apply(op);
        let got = run_model_op(&nodes[*node], table, op).await;
        prop_assert_eq!(got, want, "step {} {:?} on node {}", step, op, node);
    }
    let reader = &nodes[ops.len() % nodes.len()];
    model.check_scan(reader.scan_all(table, "?consistent=true&limit=3").await)?;
    let info = reader.get_table(table).await;
    prop_assert_eq!(info.body["size"].as_u64(), Some(model.size() as u64));
    Ok(())
}

/// An origin that answers every key after 200 ms and counts its requests.
async fn slow_origin() -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let app = axum::Router::new().route(
        "/{key}",
        axum::routing::get(
            move |axum::extract::Path(key): axum::extract::Path<String>| {
                let counter = counter.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    axum::Json(json!({"id": key}))
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("origin") });
    (format!("http://{addr}/{{key}}"), asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn origins_on_a_cluster_table_fetch_once_per_node_and_agree() {
    let Some((_pg, nodes)) = cluster_with(3, |c| c.origin_allow = vec!["127.0.0.1:*".into()]).await
    else {
        return;
    };
    let (origin, asked) = slow_origin().await;
    let r = nodes[0]
        .create_table(
            json!({"name": "users", "persistence": "cluster", "access": "public",
            "origin": {"url": origin, "ttl_ms": 60000, "timeout_ms": 5000}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let mut misses = Vec::new();
    for node in &nodes {
        for _ in 0..20 {
            let client = node.client.clone();
            let url = node.entry_url("users", "alice");
            misses.push(tokio::spawn(async move {
                let r = client.get(url).send().await.expect("get");
                assert_eq!(r.status(), 200);
                let etag = r.headers()["etag"].to_str().expect("etag").to_owned();
                let body: Value = r.json().await.expect("json");
                (etag, body["value"].clone())
            }));
        }
    }
    let mut answers = Vec::new();
    for m in misses {
        answers.push(m.await.expect("task"));
    }
    let fetches = asked.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (1..=3).contains(&fetches),
        "at most one origin request per node: {fetches}"
    );
    for (etag, value) in &answers {
        assert_eq!(value, &json!({"id": "alice"}));
        assert_eq!(
            etag, &answers[0].0,
            "every node answers the one stored version"
        );
    }
    for node in &nodes {
        let r = get_consistent(node, "users", "alice").await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.header("etag"), Some(answers[0].0.as_str()));
        let ttl = r.body["ttl_ms"]
            .as_u64()
            .expect("stored with the origin's ttl");
        assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");
    }
    let info = nodes[1].get_table("users").await.body;
    assert_eq!(info["size"], 1);
    assert_eq!(info["stats"]["inserts"], 1, "one stored value: {info}");
}

#[tokio::test]
async fn the_hot_copy_stays_within_its_byte_budget() {
    let budget = 64 * 1024;
    let Some((_pg, nodes)) = cluster_with(1, |c| c.cluster_cache_bytes = budget).await else {
        return;
    };
    let node = &nodes[0];
    create(node, "big", "set").await;
    let filler = "x".repeat(200);
    let keys = 1_000;
    for i in 0..keys {
        let r = node
            .put("big", &format!("k{i}"), json!({"i": i, "pad": filler}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text);
    }
    // Plain reads of everything, twice: every answer is right whether it
    // came from the hot copy or from PostgreSQL.
    const MISSES: &str = "larder_cluster_hot_reads_total{result=\"miss\"}";
    const HITS: &str = "larder_cluster_hot_reads_total{result=\"hit\"}";
    let misses_before = node.metric(MISSES).await;
    for _ in 0..2 {
        for i in 0..keys {
            let r = node.get("big", &format!("k{i}")).await;
            assert_eq!(r.status, 200, "{}", r.text);
            assert_eq!(r.body["value"]["i"], i);
            let held = node.metric("larder_cluster_hot_bytes").await;
            assert!(held <= budget as f64, "hot copy holds {held} of {budget}");
        }
    }
    let misses = node.metric(MISSES).await - misses_before;
    assert!(
        misses > keys as f64,
        "250 KB of rows cannot all stay in 64 KiB: {misses} misses"
    );
    // A key read again and again stays hot while the rest stream past.
    node.get("big", "k999").await;
    for i in 0..100 {
        node.get("big", &format!("k{i}")).await;
        let hits = node.metric(HITS).await;
        node.get("big", "k999").await;
        assert_eq!(
            node.metric(HITS).await,
            hits + 1.0,
            "k999 stayed hot, round {i}"
        );
    }
}

#[tokio::test]
async fn a_node_started_while_the_database_is_down_serves_local_tables_then_cluster_ones() {
    let Some(pg) = PgServer::start() else {
        return;
    };
    let url = pg.create_db("larder").await;
    // A node with a durable local table, stopped.
    let first = spawn_with(|c| c.cluster_url = Some(url.clone())).await;
    let r = first
        .create_table(json!({"name": "local", "persistence": "sync"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(first.put("local", "k", json!(1)).await.status, 201);
    let dir = first.stop().await;
    // It restarts while PostgreSQL is down: local tables are served.
    pg.stop();
    let node = common::spawn_on_with(dir, |c| {
        c.cluster_url = Some(url);
        c.cluster_poll_ms = 2;
    })
    .await;
    let ready = node.send(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.body["cluster"], "unavailable", "{}", ready.text);
    assert_eq!(node.get("local", "k").await.body["value"], 1);
    assert_eq!(node.put("local", "k", json!(2)).await.status, 200);
    // Cluster tables answer 503, and so does creating any table: names are
    // one namespace, and only PostgreSQL knows the cluster's.
    node.create_table(json!({"name": "other"}))
        .await
        .assert_error(503, "unavailable");
    let r = node
        .create_table(json!({"name": "c", "persistence": "cluster"}))
        .await;
    r.assert_error(503, "unavailable");
    assert!(r.header("retry-after").is_some());
    let r = node.get("c", "k").await;
    r.assert_error(503, "unavailable");

    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = node
            .create_table(json!({"name": "c", "persistence": "cluster", "access": "public"}))
            .await;
        if r.status == 201 {
            break;
        }
        r.assert_error(503, "unavailable");
        assert!(Instant::now() < deadline, "never reached the database");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.put("c", "k", json!(2)).await.status, 201);
    let r = get_consistent(&node, "c", "k").await;
    assert_eq!(r.body["value"], 2, "{}", r.text);
    let ready = node.send(Method::GET, "/readyz", None, &[]).await;
    assert_eq!(ready.body["cluster"], "ok", "{}", ready.text);
}

#[tokio::test]
async fn a_retry_sent_to_another_node_is_answered_from_the_record() {
    let Some((_pg, nodes)) = cluster(2).await else {
        return;
    };
    create(&nodes[0], "c", "set").await;
    let incr = |node: &TestApp, key: &'static str| {
        let req = node
            .client
            .post(format!("{}/counter", node.entry_url("c", "n")))
            .header("idempotency-key", key)
            .body(r#"{"default":0}"#);
        async move {
            let r = Reply::from(req.send().await.expect("counter")).await;
            assert_eq!(r.status, 200, "{}", r.text);
            (
                r.body["value"].clone(),
                r.header("idempotent-replayed").is_some(),
            )
        }
    };
    assert_eq!(incr(&nodes[0], "once").await, (json!(1), false));
    assert_eq!(incr(&nodes[1], "once").await, (json!(1), true));
    assert_eq!(incr(&nodes[0], "once").await, (json!(1), true));
    assert_eq!(incr(&nodes[1], "twice").await, (json!(2), false));
    let r = get_consistent(&nodes[0], "c", "n").await;
    assert_eq!(r.body["value"], 2);
}

/// A keyed increment of counter `n` in table `c` sent to `node`, retried
/// while the key is in flight elsewhere or the database asks for a retry;
/// its value and whether it was replayed.
async fn keyed_incr(node: &TestApp, key: &str) -> (i64, bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let sent = node
            .client
            .post(format!("{}/counter", node.entry_url("c", "n")))
            .header("idempotency-key", key)
            .body(r#"{"default":0}"#)
            .send()
            .await
            .expect("counter");
        let r = Reply::from(sent).await;
        match r.status.as_u16() {
            200 => {
                return (
                    r.body["value"].as_i64().expect("value"),
                    r.header("idempotent-replayed").is_some(),
                )
            }
            409 | 503 => {
                assert!(
                    Instant::now() < deadline,
                    "{key} never answered: {}",
                    r.text
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            _ => panic!("{key}: {} {}", r.status, r.text),
        }
    }
}

#[tokio::test]
async fn the_same_keyed_increment_sent_to_two_nodes_at_once_applies_once() {
    let Some((_pg, nodes)) = cluster(2).await else {
        return;
    };
    create(&nodes[0], "c", "set").await;
    let nodes = std::sync::Arc::new(nodes);
    for round in 1..=50i64 {
        let key = format!("round-{round}");
        // Two requests per node, all released together.
        let start = std::sync::Arc::new(tokio::sync::Barrier::new(4));
        let tasks: Vec<_> = (0..4)
            .map(|i| {
                let (nodes, key, start) = (nodes.clone(), key.clone(), start.clone());
                tokio::spawn(async move {
                    start.wait().await;
                    keyed_incr(&nodes[i % 2], &key).await
                })
            })
            .collect();
        let mut answers = Vec::new();
        for t in tasks {
            answers.push(t.await.expect("task"));
        }
        assert!(
            answers.iter().all(|(v, _)| *v == round),
            "round {round}: {answers:?}"
        );
        assert_eq!(
            answers.iter().filter(|(_, replayed)| !replayed).count(),
            1,
            "round {round}: exactly one request applies: {answers:?}"
        );
    }
    let r = get_consistent(&nodes[0], "c", "n").await;
    assert_eq!(r.body["value"], 50, "{}", r.text);
}

#[tokio::test]
async fn keyed_increments_apply_once_when_a_node_is_killed_mid_write() {
    let Some((pg, nodes)) = cluster(1).await else {
        return;
    };
    create(&nodes[0], "c", "set").await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut victim = child_node(&pg, dir.path()).await;
    // Writers send keyed increments to the child until it dies; each
    // remembers every key it sent and the answers it got.
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sent = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for w in 0..8 {
        let client = reqwest::Client::new();
        let url = format!("{}/counter", victim.entry_url("c", "n"));
        let (acked, sent) = (acked.clone(), sent.clone());
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let key = format!("w{w}-{i}");
                sent.lock().unwrap().push(key.clone());
                let answer = client
                    .post(&url)
                    .header("idempotency-key", &key)
                    .body(r#"{"default":0}"#)
                    .send()
                    .await;
                let Ok(r) = answer else { return };
                if r.status() != 200 {
                    return;
                }
                let Ok(body) = r.json::<Value>().await else {
                    return;
                };
                acked.lock().unwrap().push((key, body["value"].clone()));
            }
        }));
    }
    kill_when(&mut victim, || acked.lock().unwrap().len() >= 200, writers).await;
    // Every key sent, acknowledged or cut off, is retried on the survivor.
    let acked: std::collections::HashMap<String, Value> =
        acked.lock().unwrap().iter().cloned().collect();
    let sent = sent.lock().unwrap().clone();
    let mut values = std::collections::HashSet::new();
    for key in &sent {
        let (value, replayed) = keyed_incr(&nodes[0], key).await;
        if let Some(first) = acked.get(key) {
            assert!(replayed, "{key} was applied again");
            assert_eq!(json!(value), *first, "{key} answered differently");
        }
        assert!(values.insert(value), "{key}: value {value} given twice");
    }
    let r = get_consistent(&nodes[0], "c", "n").await;
    assert_eq!(
        r.body["value"],
        json!(sent.len()),
        "one increment per distinct key ({} acknowledged before the kill)",
        acked.len()
    );
}

#[tokio::test]
async fn a_cluster_table_exports_and_imports_with_its_deadlines() {
    let Some((_pg, nodes)) = cluster(2).await else {
        return;
    };
    create(&nodes[0], "src", "duplicate_bag").await;
    for i in 0..20 {
        let query = if i % 3 == 0 { "?ttl_ms=3600000" } else { "" };
        let r = nodes[0]
            .put_with("src", &format!("k{}", i % 6), json!(i), query, &[])
            .await;
        assert!(r.status.is_success(), "{}", r.text);
    }
    let export = |node: &TestApp, table: &str| {
        let req = node
            .client
            .get(node.url(&format!("/v1/tables/{table}/export")));
        async move {
            let text = req
                .send()
                .await
                .expect("export")
                .text()
                .await
                .expect("body");
            let mut objects: Vec<String> = text.lines().skip(1).map(str::to_owned).collect();
            objects.pop();
            objects.sort();
            (text, objects)
        }
    };
    let (stream, objects) = export(&nodes[1], "src").await;
    assert_eq!(objects.len(), 20);
    let r = nodes[1]
        .send(
            Method::POST,
            "/v1/tables/import?name=dst",
            Some(stream.into_bytes()),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["persistence"], "cluster");
    let (_, copied) = export(&nodes[0], "dst").await;
    assert_eq!(
        copied, objects,
        "the same objects and deadlines, seen from the other node"
    );
}

/// Opens a watch on `node`, waiting (up to a deadline) for the node to have
/// read the change log far enough to start one (503 until then).
async fn cluster_watch(node: &TestApp, table: &str, last: Option<u64>) -> common::sse::Stream {
    let url = node.url(&format!("/v1/tables/{}/watch", common::enc(table)));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match common::sse::Stream::try_open(&node.client, &url, last).await {
            Ok(s) => return s,
            Err(503) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await
            }
            Err(status) => panic!("watch on a cluster table: {status}"),
        }
    }
}

fn assert_revisions_increase(events: &[common::sse::Event]) {
    for e in events {
        assert_eq!(e.id, Some(e.revision()), "{e:?}");
    }
    for pair in events.windows(2) {
        assert!(pair[0].revision() < pair[1].revision(), "{pair:?}");
    }
}

#[tokio::test]
async fn a_cluster_watch_on_any_node_sees_every_nodes_changes_in_revision_order() {
    let Some((_pg, nodes)) = cluster(3).await else {
        return;
    };
    let nodes = std::sync::Arc::new(nodes);
    create(&nodes[0], "w", "set").await;
    let mut first = cluster_watch(&nodes[0], "w", None).await;
    let mut last = cluster_watch(&nodes[2], "w", None).await;

    const ROUNDS: usize = 20;
    let writers: Vec<_> = (0..3)
        .map(|n| {
            let nodes = nodes.clone();
            tokio::spawn(async move {
                let node = &nodes[n];
                let mut etags = Vec::new();
                for i in 0..ROUNDS {
                    let r = node
                        .counter("w", &format!("c{}", i % 2), json!({"default": 0}))
                        .await;
                    assert_eq!(r.status, 200, "{}", r.text);
                    let r = node.put("w", &format!("p{n}"), json!(i)).await;
                    assert!(r.status == 200 || r.status == 201, "{}", r.text);
                    let etag: u64 = r.header("etag").unwrap().trim_matches('"').parse().unwrap();
                    etags.push(etag);
                }
                etags
            })
        })
        .collect();
    let mut etags = std::collections::HashMap::new();
    for (n, w) in writers.into_iter().enumerate() {
        etags.insert(format!("p{n}"), w.await.unwrap());
    }
    let total = 3 * ROUNDS * 2;
    let seen = first.events(total).await;
    assert_eq!(last.events(total).await, seen, "every node tells the same");
    assert_revisions_increase(&seen);
    let mut per_key: std::collections::HashMap<String, Vec<(i64, u64)>> = Default::default();
    for e in &seen {
        assert_eq!(e.event, "put", "{e:?}");
        per_key
            .entry(e.key().to_owned())
            .or_default()
            .push((e.data["value"].as_i64().unwrap(), e.revision()));
    }
    for c in ["c0", "c1"] {
        let values: Vec<i64> = per_key[c].iter().map(|(v, _)| *v).collect();
        assert_eq!(values, (1..=values.len() as i64).collect::<Vec<_>>(), "{c}");
    }
    for n in 0..3 {
        let key = format!("p{n}");
        let values: Vec<i64> = per_key[&key].iter().map(|(v, _)| *v).collect();
        assert_eq!(values, (0..ROUNDS as i64).collect::<Vec<_>>(), "{key}");
        let revisions: Vec<u64> = per_key[&key].iter().map(|(_, r)| *r).collect();
        assert_eq!(revisions, etags[&key], "a put's revision is its ETag");
    }
}

/// A writer held up between taking its version and writing its change
/// (here a transaction of the test's own, which takes a version and then
/// waits while the node reads the log several times, writes a higher
/// version and reads the log again) is still told, and before the higher
/// version.
#[tokio::test]
async fn a_change_held_up_after_taking_its_version_is_told_before_later_ones() {
    let Some((pg, nodes)) = cluster(1).await else {
        return;
    };
    let node = &nodes[0];
    create(node, "w", "set").await;
    let mut watch = cluster_watch(node, "w", None).await;
    let mut db = pg.client("larder").await;
    let table_id: i64 = db
        .query_one("SELECT id FROM larder_tables WHERE name = 'w'", &[])
        .await
        .unwrap()
        .get(0);
    let tx = db.transaction().await.unwrap();
    let held: i64 = tx
        .query_one("SELECT larder_next_version()", &[])
        .await
        .unwrap()
        .get(0);
    // While nothing newer than the held transaction has finished, and
    // again once a later write has.
    polls(node, 3).await;
    let r = node.put("w", "later", json!(2)).await;
    assert_eq!(r.status, 201, "{}", r.text);
    let later: u64 = r.header("etag").unwrap().trim_matches('"').parse().unwrap();
    assert!(later > held as u64);
    polls(node, 3).await;
    tx.execute(
        "INSERT INTO larder_changes (table_id, key, version, kind, at, event, value) \
         VALUES ($1, 'held', $2, 0, 0, 0, '1')",
        &[&table_id, &held],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let told: Vec<(String, u64)> = watch
        .events(2)
        .await
        .iter()
        .map(|e| (e.key().to_owned(), e.revision()))
        .collect();
    assert_eq!(
        told,
        [
            ("held".to_owned(), held as u64),
            ("later".to_owned(), later)
        ]
    );
}

/// Waits until `node` has read the change log `n` more times.
async fn polls(node: &TestApp, n: u32) {
    const POLLS: &str = "larder_cluster_log_polls_total";
    let target = node.metric(POLLS).await + f64::from(n);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while node.metric(POLLS).await < target {
        assert!(
            std::time::Instant::now() < deadline,
            "the node stopped reading the log"
        );
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
}

#[tokio::test]
async fn cluster_watches_tell_deletes_bag_values_expiry_eviction_clear_and_drop() {
    let Some((_pg, nodes)) = cluster(2).await else {
        return;
    };
    let (a, b) = (&nodes[0], &nodes[1]);
    create(a, "s", "set").await;
    create(a, "bag", "bag").await;
    let r = a
        .create_table(
            json!({"name": "lru", "persistence": "cluster", "max_entries": 1, "eviction": "lru"}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let mut s = cluster_watch(b, "s", None).await;
    let mut bag = cluster_watch(b, "bag", None).await;
    let mut lru = cluster_watch(b, "lru", None).await;

    a.put("s", "k", json!(1)).await;
    assert_eq!(a.delete("s", "k").await.status, 204);
    // Deleting what is not there changes nothing and tells nothing.
    assert_eq!(a.delete("s", "k").await.status, 204);
    a.put_with("s", "short", json!(2), "?ttl_ms=50", &[]).await;
    let events = s.events(4).await;
    let shape: Vec<(&str, &str)> = events.iter().map(|e| (e.event.as_str(), e.key())).collect();
    assert_eq!(
        shape,
        [
            ("put", "k"),
            ("delete", "k"),
            ("put", "short"),
            ("expire", "short")
        ]
    );
    assert_revisions_increase(&events);
    assert_eq!(
        a.send(Method::DELETE, "/v1/tables/s/entries", None, &[])
            .await
            .status,
        204
    );
    assert_eq!(
        a.send(Method::DELETE, "/v1/tables/s", None, &[])
            .await
            .status,
        204
    );
    let tail = s.events(2).await;
    assert_eq!(tail[0].event, "clear");
    assert_eq!(tail[1].event, "drop");
    assert_eq!(s.frame().await, None, "the stream ends after drop");

    a.put("bag", "k", json!("x")).await;
    a.put("bag", "k", json!("x")).await;
    a.put("bag", "k", json!("y")).await;
    let removed = a
        .send(
            Method::POST,
            "/v1/tables/bag/entries/k/delete_object",
            Some(br#""x""#.to_vec()),
            &[],
        )
        .await;
    assert_eq!(removed.status, 204);
    let events = bag.events(3).await;
    let told: Vec<(&str, &Value)> = events
        .iter()
        .map(|e| (e.event.as_str(), &e.data["value"]))
        .collect();
    assert_eq!(
        told,
        [
            ("put", &json!("x")),
            ("put", &json!("y")),
            ("delete", &json!("x"))
        ]
    );

    a.put("lru", "old", json!(1)).await;
    a.put("lru", "new", json!(2)).await;
    let events = lru.events(3).await;
    let shape: Vec<(&str, &str)> = events.iter().map(|e| (e.event.as_str(), e.key())).collect();
    // The eviction is made in the new key's transaction, before its insert.
    assert_eq!(shape, [("put", "old"), ("evict", "old"), ("put", "new")]);
}

#[tokio::test]
async fn a_cluster_watch_resumes_from_the_nodes_history() {
    let Some((_pg, nodes)) = cluster(2).await else {
        return;
    };
    create(&nodes[0], "r", "set").await;
    let mut s = cluster_watch(&nodes[1], "r", None).await;
    for i in 0..5 {
        nodes[0].put("r", &format!("k{i}"), json!(i)).await;
    }
    let seen = s.events(5).await;
    drop(s);
    for i in 5..9 {
        nodes[0].put("r", &format!("k{i}"), json!(i)).await;
    }
    let mut resumed = cluster_watch(&nodes[1], "r", Some(seen[4].revision())).await;
    let missed = resumed.events(4).await;
    let values: Vec<Value> = missed.iter().map(|e| e.data["value"].clone()).collect();
    assert_eq!(values, (5..9).map(|i| json!(i)).collect::<Vec<_>>());
    assert!(missed[0].revision() > seen[4].revision());
    // A revision from before this node's history (which starts after at
    // least the first version ever handed out) is a reset.
    let mut old = cluster_watch(&nodes[1], "r", Some(0)).await;
    assert_eq!(old.event().await.unwrap().event, "reset");
}

#[tokio::test]
async fn a_schema_2_database_is_upgraded_and_its_old_log_rows_tell_no_watcher() {
    let Some(pg) = PgServer::start() else {
        return;
    };
    let url = pg.create_db("larder").await;
    // The database as a node of the previous release left it: steps 1 and
    // 2, and a change-log row without an event or value.
    let client = pg.client("larder").await;
    client
        .batch_execute("CREATE TABLE larder_meta (name text PRIMARY KEY, value bigint NOT NULL)")
        .await
        .unwrap();
    client
        .batch_execute(include_str!(
            "../migrations/cluster/0001_cluster_tables.sql"
        ))
        .await
        .unwrap();
    client
        .batch_execute(include_str!("../migrations/cluster/0002_idempotency.sql"))
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO larder_meta VALUES ('schema_version', 2); \
             INSERT INTO larder_changes (table_id, key, version, kind, at) \
             VALUES (999999, 'old', nextval('larder_versions'), 0, \
                     (extract(epoch FROM now()) * 1000)::bigint)",
        )
        .await
        .unwrap();

    let node = spawn_with(|c| {
        c.cluster_url = Some(url);
        c.cluster_poll_ms = 2;
    })
    .await;
    let version: i64 = client
        .query_one(
            "SELECT value FROM larder_meta WHERE name = 'schema_version'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, larder::cluster::SCHEMA_VERSION);
    let old: (i16, Option<String>) = client
        .query_one(
            "SELECT event, value FROM larder_changes WHERE key = 'old'",
            &[],
        )
        .await
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(old, (0, None), "an old row reads as a put without a value");
    create(&node, "t", "set").await;
    let mut s = cluster_watch(&node, "t", None).await;
    node.put("t", "k", json!("new")).await;
    let e = s.event().await.unwrap();
    assert_eq!((e.event.as_str(), e.key()), ("put", "k"));
    assert_eq!(e.data["value"], "new");
}

#[tokio::test]
async fn a_node_that_missed_part_of_the_change_log_tells_its_watchers_to_reset() {
    let Some((pg, nodes)) = cluster(2).await else {
        return;
    };
    create(&nodes[0], "gap", "set").await;
    let mut stream = cluster_watch(&nodes[1], "gap", None).await;
    assert_eq!(nodes[0].put("gap", "a", json!(1)).await.status, 201);
    let first = stream.events(1).await;
    assert_eq!(first[0].event, "put");
    let before = first[0].revision();
    // As if the log had been pruned past where node 1 is (it was cut off
    // for longer than the retention): it cannot know what it missed.
    let db = pg.client("larder").await;
    db.execute(
        "UPDATE larder_meta SET value = CASE name \
           WHEN 'pruned_xid' THEN pg_current_xact_id()::text::bigint ELSE 0 END \
         WHERE name IN ('pruned_xid', 'pruned_id')",
        &[],
    )
    .await
    .expect("fake a prune");
    let next = stream.events(1).await;
    assert_eq!(next[0].event, "reset", "{next:?}");
    assert!(next[0].revision() > before, "{next:?}");
    // And it follows the live changes again.
    assert_eq!(nodes[0].put("gap", "b", json!(2)).await.status, 201);
    let after = stream.events(1).await;
    assert_eq!(after[0].event, "put", "{after:?}");
    assert!(after[0].revision() > next[0].revision());
}
