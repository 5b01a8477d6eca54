//! Honest acknowledgements and exactly-once retries, driven through the
//! real server: a round that fails to reach disk undoes the changes it
//! held on `sync` tables and answers 503 (507 on a full disk) in the JSON
//! error shape, reads go on, writes are refused until the disk takes writes
//! again and then resume by themselves, and a retry then applies once;
//! revisions never go back across a SIGKILL, on any persistence mode, and a
//! watch resumed across one never gets an id it had before.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::child::ChildServer;
use common::faults::Faults;
use common::sse::Stream;
use common::{spawn_with_engine, TestApp};
use reqwest::Method;
use serde_json::{json, Value};

async fn sync_app() -> (Arc<Faults>, TestApp) {
    let faults = Arc::new(Faults::default());
    let app = spawn_with_engine(faults.wrapper()).await;
    let r = app
        .create_table(json!({"name": "s", "persistence": "sync"}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    app.table("m", "set").await;
    (faults, app)
}

/// Polls until a write to `s` succeeds again, for up to 30 s.
async fn until_writes_resume(app: &TestApp) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.put("s", "probe", json!(1)).await;
        if r.status == 201 || r.status == 200 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "writes never resumed: {}",
            r.text
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn failed_flushes_undo_and_refuse(full: bool) {
    let (faults, app) = sync_app().await;
    assert_eq!(app.put("s", "kept", json!("before")).await.status, 201);
    let counter = "/v1/tables/s/entries/n/counter";
    for _ in 0..3 {
        let r = app
            .send(
                Method::POST,
                counter,
                Some(br#"{"default":0}"#.to_vec()),
                &[],
            )
            .await;
        assert_eq!(r.status, 200);
    }
    faults.fail(full);
    let (status, code) = if full {
        (507, "storage_full")
    } else {
        (503, "unavailable")
    };
    // The write that meets the failed round is told so, and undone.
    let r = app.put("s", "lost", json!("never")).await;
    r.assert_error(status, code);
    assert_eq!(
        app.get("s", "lost").await.status,
        404,
        "the failed PUT is invisible"
    );
    // Until the disk takes writes, durable writes are refused up front,
    // with the failed increment nowhere.
    let r = app
        .send(
            Method::POST,
            counter,
            Some(br#"{"default":0}"#.to_vec()),
            &[],
        )
        .await;
    r.assert_error(status, code);
    assert_eq!(app.get("s", "n").await.body["value"], 3);
    // Reads, and memory tables, go on.
    assert_eq!(app.get("s", "kept").await.body["value"], "before");
    assert_eq!(app.put("m", "x", json!(1)).await.status, 201);
    assert_eq!(app.get("m", "x").await.status, 200);
    faults.heal();
    until_writes_resume(&app).await;
    // A keyed retry of the failed increment applies once.
    for _ in 0..2 {
        let r = app
            .send(
                Method::POST,
                counter,
                Some(br#"{"default":0}"#.to_vec()),
                &[("idempotency-key", "after-the-fault")],
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["value"], 4);
    }
    assert!(faults.refused.load(std::sync::atomic::Ordering::SeqCst) > 0);
}

#[tokio::test]
async fn a_failed_flush_undoes_sync_changes_and_writes_resume_after() {
    failed_flushes_undo_and_refuse(false).await;
}

#[tokio::test]
async fn a_full_disk_is_507_and_writes_resume_when_it_has_room() {
    failed_flushes_undo_and_refuse(true).await;
}

#[tokio::test]
async fn a_keyed_write_met_by_a_failed_flush_is_applied_once_by_its_retry() {
    let (faults, app) = sync_app().await;
    let counter = "/v1/tables/s/entries/n/counter";
    let keyed = |key: &'static str| {
        let app = &app;
        async move {
            app.send(
                Method::POST,
                counter,
                Some(br#"{"default":0}"#.to_vec()),
                &[("idempotency-key", key)],
            )
            .await
        }
    };
    assert_eq!(keyed("one").await.body["value"], 1);
    faults.fail(false);
    keyed("two").await.assert_error(503, "unavailable");
    faults.heal();
    until_writes_resume(&app).await;
    // The failed request's retry runs afresh: no record was kept of it.
    let r = keyed("two").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["value"], 2);
    assert!(r.header("idempotent-replayed").is_none());
    let again = keyed("two").await;
    assert_eq!(again.body["value"], 2);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
}

/// The revision a write's ETag carries.
fn etag_of(r: &reqwest::Response) -> u64 {
    r.headers()["etag"]
        .to_str()
        .unwrap()
        .trim_matches('"')
        .parse()
        .unwrap()
}

#[tokio::test]
async fn revisions_never_go_back_across_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut highest = 0;
    for round in 0..3 {
        let mut server = ChildServer::start(dir.path()).await;
        let base = server.base.clone();
        // Durable tables once; the memory table again after each restart.
        let tables: &[(&str, &str)] = if round == 0 {
            &[("p", "periodic"), ("s", "sync"), ("m", "none")]
        } else {
            &[("m", "none")]
        };
        {
            for &(name, mode) in tables {
                let body = if mode == "periodic" {
                    json!({"name": name, "persistence": mode, "auto_save_ms": 86_400_000})
                } else {
                    json!({"name": name, "persistence": mode})
                };
                let r = client
                    .post(format!("{base}/v1/tables"))
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        }
        for i in 0..200 {
            for table in ["p", "s", "m"] {
                let r = client
                    .put(server.entry_url(table, &format!("k{i}")))
                    .body(format!("{round}"))
                    .send()
                    .await
                    .unwrap();
                assert!(
                    r.status().is_success(),
                    "round {round}, {table}/k{i}: {:?}",
                    r.status()
                );
                let revision = etag_of(&r);
                assert!(
                    revision > highest,
                    "round {round}: {table} got revision {revision} after {highest} was handed out"
                );
                highest = revision;
            }
        }
        // The periodic table's writes are not saved (a day's auto_save):
        // the kill loses them, and their revisions must not come back.
        server.kill9();
    }
}

#[tokio::test]
async fn a_watch_resumed_across_a_sigkill_never_gets_an_id_twice() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let mut server = ChildServer::start(dir.path()).await;
    let base = server.base.clone();
    let r = client
        .post(format!("{base}/v1/tables"))
        .json(&json!({"name": "p", "persistence": "periodic", "auto_save_ms": 86_400_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut stream = Stream::open(&client, &format!("{base}/v1/tables/p/watch"), None).await;
    for i in 0..20 {
        let r = client
            .put(server.entry_url("p", &format!("k{i}")))
            .body("1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let seen: Vec<u64> = stream
        .events(20)
        .await
        .iter()
        .filter_map(|e| e.id)
        .collect();
    let last = *seen.last().unwrap();
    drop(stream);
    server.kill9();
    let server = ChildServer::start(dir.path()).await;
    let base = server.base.clone();
    let mut resumed = Stream::open(&client, &format!("{base}/v1/tables/p/watch"), Some(last)).await;
    for i in 0..5 {
        let r = client
            .put(server.entry_url("p", &format!("after{i}")))
            .body("2")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let events = resumed.events(6).await;
    assert_eq!(events[0].event, "reset", "{events:?}");
    for e in &events {
        let id = e.id.expect("an id");
        assert!(
            id > last,
            "{} sent with id {id} after {last} was sent before the crash",
            e.event
        );
        assert!(!seen.contains(&id));
    }
    let _: Value = json!(null);
}

/// A real full disk: the data directory on an 16 MiB tmpfs, filled up by
/// a file beside it. Writes to a `sync` table then get 507 and are not
/// visible; once the file is removed, writes resume without a restart.
/// Needs root (to mount); says so loudly when it cannot, and fails in CI.
#[tokio::test]
async fn a_real_full_disk_is_507_and_writes_resume_when_space_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&mnt)
        .output();
    if !mounted.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match &mounted {
            Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
            Err(e) => e.to_string(),
        };
        assert!(
            std::env::var_os("LARDER_TEST_REQUIRE_MOUNT").is_none(),
            "cannot mount a tmpfs for the full-disk test (LARDER_TEST_REQUIRE_MOUNT is set): {why}"
        );
        eprintln!(
            "SKIPPED LOUDLY: cannot mount a tmpfs for the full-disk test (needs root): {why}"
        );
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.clone());
    let server = ChildServer::start(&mnt.join("data")).await;
    let client = reqwest::Client::new();
    let r = client
        .post(format!("{}/v1/tables", server.base))
        .json(&json!({"name": "s", "persistence": "sync"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(
        client
            .put(server.entry_url("s", "before"))
            .body("1")
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    // Fill the disk, leaving a little room.
    let filler = mnt.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
    }
    let value = json!({"pad": "f".repeat(200_000)});
    let mut refused = None;
    for i in 0..200 {
        let key = format!("k{i}");
        let r = client
            .put(server.entry_url("s", &key))
            .body(value.to_string())
            .send()
            .await
            .unwrap();
        match r.status().as_u16() {
            201 => continue,
            507 => {
                let body: Value = r.json().await.unwrap();
                assert_eq!(body["error"]["code"], "storage_full", "{body}");
                refused = Some(key);
                break;
            }
            other => panic!("{key}: {other} {}", r.text().await.unwrap()),
        }
    }
    let refused = refused.expect("the disk filled up");
    let r = client
        .get(server.entry_url("s", &refused))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404, "the refused write is not visible");
    let r = client
        .get(server.entry_url("s", "before"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "reads go on");
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = client
            .put(server.entry_url("s", &refused))
            .body(value.to_string())
            .send()
            .await
            .unwrap();
        if r.status() == 201 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "writes did not resume once the disk had room: {}\n{}",
            r.status(),
            server.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(server);
}
