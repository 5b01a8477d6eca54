//! The on-disk format: an older data directory is upgraded on start, a newer
//! one is refused, and unusable directories stop the server with one line.

mod common;

use common::spawn_on;
use larder::app::App;
use larder::config::Config;
use larder::persist::{encode_body, Engine, SledEngine, StoredTable, FORMAT_VERSION};
use larder::store::{Object, Objects, Slot, TableSpec, TableType, Value};
use serde_json::json;

fn value(s: &str) -> Value {
    Value::parse(s.as_bytes()).unwrap()
}

/// Writes a format-1 directory by hand: records without the format byte,
/// no revision watermark.
fn write_format_1(path: &std::path::Path) {
    let engine = SledEngine::open(path).unwrap();
    engine
        .put_meta("format_version", &1u32.to_be_bytes())
        .unwrap();
    let mut spec = TableSpec::new("old", TableType::Bag, "anonymous");
    spec.settings.persistence = larder::store::Persistence::Periodic;
    spec.settings.auto_save_ms = Some(1000);
    spec.created_at = 1_700_000_000_000;
    engine
        .put_table_def("old", &StoredTable::of(&spec).encode())
        .unwrap();
    let mut changes = Vec::new();
    for i in 0..250u64 {
        let slot = Slot::new(
            Objects::Many(Box::new(vec![
                Object {
                    seq: i * 2 + 1,
                    value: value(&format!("{{\"n\":{i}}}")),
                },
                Object {
                    seq: i * 2 + 2,
                    value: value("\"second\""),
                },
            ])),
            i * 2 + 2,
            0,
            0,
            0,
        );
        let mut record = Vec::new();
        encode_body(&slot, &mut record);
        changes.push((format!("key{i:03}").into_bytes(), Some(record)));
    }
    engine.write("old", changes).unwrap();
    engine.flush().unwrap();
}

fn format_version(path: &std::path::Path) -> u32 {
    let engine = SledEngine::open(path).unwrap();
    let bytes = engine.get_meta("format_version").unwrap().unwrap();
    u32::from_be_bytes(bytes.try_into().unwrap())
}

#[tokio::test]
async fn a_format_1_directory_is_upgraded_and_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    write_format_1(&data);
    let app = spawn_on(dir).await;
    let info = app.get_table("old").await.body;
    assert_eq!(info["type"], "bag");
    assert_eq!(info["size"], 500);
    assert_eq!(
        app.get("old", "key007").await.body["values"],
        json!([{"n": 7}, "second"])
    );
    // Versions continue above what the old directory handed out.
    let etag = app
        .put("old", "new", json!(1))
        .await
        .header("etag")
        .unwrap()
        .to_owned();
    let v: u64 = etag.trim_matches('"').parse().unwrap();
    assert!(v > 500, "{v}");
    let dir = app.stop().await;
    assert_eq!(format_version(&dir.path().join("data")), FORMAT_VERSION);
    let engine = SledEngine::open(&dir.path().join("data")).unwrap();
    let mut firsts = Vec::new();
    engine
        .for_each("old", &mut |_, r| {
            firsts.push(r[0]);
            Ok(())
        })
        .unwrap();
    assert!(
        firsts.iter().all(|b| *b == larder::persist::RECORD_V3),
        "every record rewritten"
    );
}

#[tokio::test]
async fn a_directory_from_a_newer_larder_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let engine = SledEngine::open(&data).unwrap();
        engine
            .put_meta("format_version", &99u32.to_be_bytes())
            .unwrap();
        engine.flush().unwrap();
    }
    let err = App::build(Config::for_tests(&data))
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(msg.contains("format version is 99"), "{msg}");
    assert!(msg.contains(&data.display().to_string()), "{msg}");
    assert!(!msg.contains('\n'));
    assert_eq!(format_version(&data), 99, "not rewritten");
}

/// Starts a server on a data directory (current format) holding one
/// `sync` table `t` with `entries` stored as given, and returns the error
/// start-up fails with.
async fn start_up_error_with(entries: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let engine = SledEngine::open(&data).unwrap();
        engine
            .put_meta("format_version", &FORMAT_VERSION.to_be_bytes())
            .unwrap();
        let mut spec = TableSpec::new("t", TableType::Set, "anonymous");
        spec.settings.persistence = larder::store::Persistence::Sync;
        engine
            .put_table_def("t", &StoredTable::of(&spec).encode())
            .unwrap();
        engine.write("t", entries).unwrap();
        engine.flush().unwrap();
    }
    let app = App::build(Config::for_tests(&data)).await.unwrap();
    let err = app
        .run_until_stopped(std::future::pending())
        .await
        .expect_err("recovery fails");
    err.to_string()
}

#[tokio::test]
async fn a_corrupt_record_stops_start_up_with_a_clear_error() {
    let msg = start_up_error_with(vec![(b"k".to_vec(), Some(b"\x02\x00garbage".to_vec()))]).await;
    assert!(
        msg.contains("corrupt") && msg.contains("table 't'"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_corrupt_record_among_many_is_the_error_start_up_reports() {
    // Entries are read on one thread and decoded on another: when the
    // decoding side fails first, reading stops, and the error named is
    // the decoding one, with its key. 400 KB of entries, several batches
    // of the reading side; the first in key order is the corrupt one.
    let mut entries = vec![(b"a".to_vec(), Some(b"\x02\x00garbage".to_vec()))];
    entries.extend((0..4000).map(|i| (format!("k{i:05}").into_bytes(), Some(vec![0xff; 100]))));
    let msg = start_up_error_with(entries).await;
    assert!(
        msg.contains("corrupt") && msg.contains("table 't', key 'a'"),
        "{msg}"
    );
}

#[tokio::test]
async fn a_file_in_place_of_the_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let msg = App::build(Config::for_tests(&file))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(msg.contains("not a directory"), "{msg}");
}

#[tokio::test]
async fn a_directory_held_by_another_larder_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _other = common::child::ChildServer::start(dir.path()).await;
    let msg = App::build(Config::for_tests(dir.path()))
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(msg.contains("in use by another larder process"), "{msg}");
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
}

#[tokio::test]
async fn the_binary_exits_non_zero_with_one_line_for_an_unusable_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .env_clear()
        .envs(common::child::clean_env())
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    let lines: Vec<_> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{text}");
    assert!(
        lines[0].contains("not a directory") && !text.contains("panicked"),
        "{text}"
    );
}
