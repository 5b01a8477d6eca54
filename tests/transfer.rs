//! Export and import: round trips for every table type, refusal of
//! truncated, altered and malformed streams, and durability on `sync`.

mod common;

use common::{spawn_app, Reply, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

async fn export(app: &TestApp, table: &str) -> String {
    let r = app
        .client
        .get(app.url(&format!("/v1/tables/{table}/export")))
        .send()
        .await
        .expect("export");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    r.text().await.expect("body")
}

async fn import(app: &TestApp, stream: &str, query: &str) -> Reply {
    app.send(
        Method::POST,
        &format!("/v1/tables/import{query}"),
        Some(stream.as_bytes().to_vec()),
        &[],
    )
    .await
}

/// The object lines of an export, without header and trailer.
fn objects(stream: &str) -> Vec<&str> {
    let lines: Vec<&str> = stream.lines().collect();
    lines[1..lines.len() - 1].to_vec()
}

fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

#[tokio::test]
async fn every_table_type_round_trips() {
    let app = spawn_app().await;
    for kind in ["set", "ordered_set", "bag", "duplicate_bag"] {
        let t = format!("src_{kind}");
        let r = app
            .create_table(json!({"name": t, "type": kind, "max_entries": 1000}))
            .await;
        assert_eq!(r.status, 201);
        for (k, v) in [
            ("a", json!(1)),
            ("b", json!({"x": [1, "é"]})),
            ("a", json!(2)),
            ("a", json!(1)),
        ] {
            app.put(&t, k, v).await;
        }
        app.put_with(&t, "ttl", json!("soon"), "?ttl_ms=600000", &[])
            .await;
        let stream = export(&app, &t).await;
        let lines: Vec<&str> = stream.lines().collect();
        let head: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(head["name"], t.as_str());
        assert_eq!(head["type"], kind);
        assert_eq!(head["max_entries"], 1000);
        let trailer: Value = serde_json::from_str(lines[lines.len() - 1]).unwrap();
        assert_eq!(trailer["count"], lines.len() - 2);
        let copy = format!("copy_{kind}");
        let r = import(&app, &stream, &format!("?name={copy}")).await;
        assert_eq!(r.status, 201, "{}", r.text);
        assert_eq!(r.body["name"], copy.as_str());
        assert_eq!(r.body["type"], kind);
        let again = export(&app, &copy).await;
        if kind == "ordered_set" {
            assert_eq!(objects(&again), objects(&stream), "{kind}");
        } else {
            // Hashed tables keep each key's objects in order, not keys.
            assert_eq!(sorted(objects(&again)), sorted(objects(&stream)), "{kind}");
        }
        // The deadline is the original's, not a new one.
        let deadline = |s: &str| {
            objects(s)
                .iter()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .find(|o| o["key"] == "ttl")
                .map(|o| o["expires_at_ms"].clone())
        };
        assert!(deadline(&stream).unwrap().is_u64());
        assert_eq!(deadline(&again), deadline(&stream));
    }
}

#[tokio::test]
async fn truncated_altered_and_malformed_streams_create_nothing() {
    let app = spawn_app().await;
    app.table("s", "set").await;
    for i in 0..5 {
        app.put("s", &format!("k{i}"), json!({"n": i})).await;
    }
    let stream = export(&app, "s").await;
    let lines: Vec<&str> = stream.lines().collect();
    let cases: Vec<(String, &str)> = vec![
        // Cut before the trailer.
        (
            lines[..6].join("\n") + "\n",
            "line 7: the stream ends before its trailer",
        ),
        // One value changed.
        (
            stream.replacen("{\"n\":3}", "{\"n\":4}", 1),
            "line 7: the checksum does not match",
        ),
        // One object line dropped.
        (
            [&lines[..2], &lines[3..]].concat().join("\n") + "\n",
            "line 6: the trailer counts 5 objects, the stream has 4",
        ),
        // A line that is not an object line.
        (
            [&lines[..3], &["{\"key\":\"x\"}"], &lines[3..]]
                .concat()
                .join("\n")
                + "\n",
            "line 4: not an object line",
        ),
        (
            [&lines[..2], &["not json"], &lines[2..]]
                .concat()
                .join("\n")
                + "\n",
            "line 3: not JSON",
        ),
        (String::new(), "line 1: the stream is empty"),
        (
            "{\"name\":\"s\",\"bogus\":1}\n".into(),
            "line 1: unknown field `bogus`",
        ),
    ];
    for (i, (body, message)) in cases.iter().enumerate() {
        let r = import(&app, body, &format!("?name=bad{i}")).await;
        r.assert_error(400, "invalid_import");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with(message),
            "case {i}: {}",
            r.text
        );
        assert_eq!(
            app.get_table(&format!("bad{i}")).await.status,
            404,
            "case {i}"
        );
    }
    // The name is taken.
    import(&app, &stream, "")
        .await
        .assert_error(409, "table_exists");
    // Intact, under another name, it goes in.
    assert_eq!(import(&app, &stream, "?name=fine").await.status, 201);
    assert_eq!(app.get_table("fine").await.body["size"], 5);
}

#[tokio::test]
async fn an_import_into_a_sync_table_is_durable_when_it_answers() {
    let app = spawn_app().await;
    let r = app
        .create_table(json!({"name": "s", "persistence": "sync", "default_ttl_ms": 3600000}))
        .await;
    assert_eq!(r.status, 201);
    let objects: Vec<(String, Value)> = (0..300).map(|i| (format!("k{i}"), json!(i))).collect();
    app.bulk("s", &objects).await;
    let stream = export(&app, "s").await;
    let r = import(&app, &stream, "?name=t").await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["default_ttl_ms"], 3600000);
    let dir = app.stop().await;
    let again = common::spawn_on(dir).await;
    let info = again.get_table("t").await.body;
    assert_eq!(info["size"], 300);
    assert_eq!(info["persistence"], "sync");
}

/// Any table of any type, exported and imported under a new name, scans
/// equal to the original.
#[test]
fn random_tables_round_trip() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let app = rt.block_on(spawn_app());
    let n = std::sync::atomic::AtomicUsize::new(0);
    let value = prop_oneof![
        (-5i64..5).prop_map(|v| json!(v)),
        "[a-zé\"\\\\ ]{0,6}".prop_map(|s| json!(s)),
        (0u8..3, -2i64..2).prop_map(|(a, b)| json!({"a": a, "b": [b, null, true]})),
    ];
    let objects = prop::collection::vec(("[a-c]{1,2}", value, prop::option::of(1u64..10)), 0..40);
    let kind = prop_oneof![
        Just("set"),
        Just("ordered_set"),
        Just("bag"),
        Just("duplicate_bag")
    ];
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&(kind, objects), |(kind, objects)| {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        rt.block_on(async {
            let (src, dst) = (format!("p{i}"), format!("q{i}"));
            app.table(&src, kind).await;
            for (k, v, ttl_hours) in &objects {
                let query =
                    ttl_hours.map_or(String::new(), |h| format!("?ttl_ms={}", h * 3_600_000));
                let r = app.put_with(&src, k, v.clone(), &query, &[]).await;
                prop_assert!(r.status.is_success(), "{}", r.text);
            }
            let stream = export(&app, &src).await;
            let r = import(&app, &stream, &format!("?name={dst}")).await;
            prop_assert_eq!(r.status.as_u16(), 201, "{}", r.text);
            let a = app.scan_all(&src, "?limit=7").await;
            let b = app.scan_all(&dst, "?limit=7").await;
            let key = |v: &Vec<(String, Value)>| {
                let mut by_key: Vec<(String, String)> =
                    v.iter().map(|(k, x)| (k.clone(), x.to_string())).collect();
                if kind != "ordered_set" {
                    // Keys in any order; each key's objects in theirs.
                    by_key.sort_by(|x, y| x.0.cmp(&y.0));
                }
                by_key
            };
            prop_assert_eq!(key(&a), key(&b));
            let again = export(&app, &dst).await;
            prop_assert_eq!(sorted(objects_of(&again)), sorted(objects_of(&stream)));
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

fn objects_of(stream: &str) -> Vec<String> {
    objects(stream).into_iter().map(str::to_owned).collect()
}

#[tokio::test]
async fn a_whole_server_export_restores_all_or_nothing() {
    let app = spawn_app().await;
    app.table("b_bag", "bag").await;
    app.table("a_set", "ordered_set").await;
    for i in 0..30 {
        app.put("a_set", &format!("k{i:02}"), json!(i)).await;
        app.put("b_bag", &format!("k{}", i % 7), json!(i)).await;
    }
    let r = app.client.get(app.url("/v1/export")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let stream = r.text().await.unwrap();
    let heads: Vec<String> = stream
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v.get("type").is_some())
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(heads, ["a_set", "b_bag"], "tables in name order");

    let other = spawn_app().await;
    let r = other
        .send(
            Method::POST,
            "/v1/import",
            Some(stream.clone().into_bytes()),
            &[],
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    let names: Vec<&str> = r.body["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a_set", "b_bag"]);
    for t in ["a_set", "b_bag"] {
        assert_eq!(
            sorted(objects_of(&export(&other, t).await)),
            sorted(objects_of(&export(&app, t).await)),
            "{t}"
        );
    }
    // One name taken: nothing is created.
    let third = spawn_app().await;
    third.table("b_bag", "set").await;
    let r = third
        .send(
            Method::POST,
            "/v1/import",
            Some(stream.clone().into_bytes()),
            &[],
        )
        .await;
    r.assert_error(409, "table_exists");
    assert_eq!(third.get_table("a_set").await.status, 404);
    // The second table altered: nothing is created, and the line is named.
    let fourth = spawn_app().await;
    let altered = stream.replacen("\"value\":3,", "\"value\":4,", 1);
    assert_ne!(altered, stream);
    let r = fourth
        .send(Method::POST, "/v1/import", Some(altered.into_bytes()), &[])
        .await;
    r.assert_error(400, "invalid_import");
    assert!(r.text.contains("checksum"), "{}", r.text);
    assert_eq!(fourth.get_table("a_set").await.status, 404);
    assert_eq!(fourth.get_table("b_bag").await.status, 404);
}

#[tokio::test]
async fn an_import_line_over_the_body_limit_is_invalid_import() {
    let app = common::spawn_with(|c| c.max_body_bytes = 64 * 1024).await;
    app.table("t", "set").await;
    app.put("t", "a", json!("x".repeat(1000))).await;
    let stream = export(&app, "t").await;
    // Under the limit, line by line, it imports.
    assert_eq!(import(&app, &stream, "?name=copy").await.status, 201);
    // A line of 100 KiB is refused, naming it, and nothing is created.
    let long = format!(
        "{{\"key\":\"b\",\"value\":\"{}\",\"expires_at_ms\":null}}",
        "y".repeat(100 * 1024)
    );
    let lines: Vec<&str> = stream.lines().collect();
    let bad = format!("{}\n{long}\n{}\n", lines[0], lines[2]);
    let r = import(&app, &bad, "?name=refused").await;
    r.assert_error(400, "invalid_import");
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("line 2: the line is longer than 65536 bytes"),
        "{}",
        r.text
    );
    app.get_table("refused")
        .await
        .assert_error(404, "table_not_found");
}

#[tokio::test]
async fn an_import_past_the_memory_limit_is_refused_and_gives_its_memory_back() {
    let app = common::spawn_with(|c| {
        c.max_memory_bytes = 8 << 20;
        c.max_body_bytes = 1 << 20;
    })
    .await;
    app.table("t", "set").await;
    let pad = "z".repeat(100_000);
    for i in 0..30 {
        app.put("t", &format!("k{i}"), json!(pad)).await;
    }
    let stream = export(&app, "t").await;
    let before = app.metric("larder_memory_bytes{kind=\"tables\"}").await;
    // The copy would need another 3 MB: it fits once...
    assert_eq!(import(&app, &stream, "?name=one").await.status, 201);
    // ...and not a second time: the staged objects count as they arrive.
    let r = import(&app, &stream, "?name=two").await;
    r.assert_error(507, "memory_limit");
    app.get_table("two")
        .await
        .assert_error(404, "table_not_found");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let now = app.metric("larder_memory_bytes{kind=\"tables\"}").await;
        // The table "one" holds about what "t" holds.
        if now < before * 2.0 + 200_000.0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{now} vs {before}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
