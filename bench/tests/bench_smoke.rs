//! The benchmark runs end to end, briefly: every row, the generator check
//! and the memory rows, on small numbers. It asserts that the run completes
//! and reports what it measured, never how fast anything was.

use std::path::PathBuf;
use std::process::Command;

/// A binary of the workspace, built (debug) if this test run has not.
fn workspace_bin(name: &str) -> PathBuf {
    let dir = std::env::current_exe()
        .expect("test path")
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory")
        .to_owned();
    let path = dir.join(name);
    if !path.exists() {
        let built = Command::new(env!("CARGO"))
            .args(["build", "--bin", name])
            .status()
            .expect("cargo runs");
        assert!(built.success(), "building {name}");
    }
    path
}

#[test]
fn the_benchmark_runs_end_to_end() {
    let wrk = Command::new("wrk").arg("--version").output();
    if !wrk.is_ok_and(|o| !o.stdout.is_empty() || !o.stderr.is_empty()) {
        // CI installs wrk and sets this, so there the test can never pass
        // by skipping.
        assert!(
            std::env::var_os("LARDER_TEST_REQUIRE_WRK").is_none(),
            "wrk is required (LARDER_TEST_REQUIRE_WRK is set; .ci/run installs it)"
        );
        eprintln!("SKIPPED: wrk is not installed (.ci/run installs it)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let run = Command::new(env!("CARGO_BIN_EXE_larder-bench"))
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| !k.starts_with("LARDER_")))
        .args(["--duration", "1s", "--rounds", "1", "--connections", "8"])
        .args(["--keys", "500", "--memory-entries", "2000"])
        // A smoke run changes nothing on the machine.
        .arg("--no-peer-install")
        .arg("--server-bin")
        .arg(workspace_bin("larder"))
        .arg("--ceiling-bin")
        .arg(workspace_bin("larder-ceiling"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("the benchmark runs");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("server and load generator share"),
        "{stdout}"
    );
    assert!(stdout.contains("generator check"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 9);
    assert_eq!(rows[0]["name"], "noop (middleware only)");
    for row in rows {
        assert!(row["larder"][0]["requests"].as_u64().unwrap() > 0, "{row}");
        assert!(row["ceiling"][0]["requests"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
    }
    // Both sync rows (64 and 256 connections) count writes per fsync.
    let counted: Vec<&str> = rows
        .iter()
        .filter(|r| r["writes_per_fsync"].as_f64().is_some_and(|w| w > 0.0))
        .filter_map(|r| r["name"].as_str())
        .collect();
    assert_eq!(
        counted,
        ["PUT replace, sync", "PUT replace, sync, 256 connections"]
    );
    let selects = &report["selects"];
    let rows = selects["rows"].as_array().expect("select rows");
    assert_eq!(rows.len(), 2, "{selects}");
    for row in rows {
        assert!(row["larder_rps"][0].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["baseline_rps"][0].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
    }
    let exposed = report["exposed"].as_array().expect("exposed rows");
    assert_eq!(exposed.len(), 2, "{exposed:?}");
    assert_eq!(exposed[0]["name"], "GET hit over HTTPS, keep-alive");
    for row in exposed {
        assert!(row["larder_rps"][0].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["baseline_rps"][0].as_f64().unwrap() > 0.0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
    }
    assert!(selects["count_objects_per_sec"].as_f64().unwrap() > 0.0);
    assert!(selects["export_objects_per_sec"].as_f64().unwrap() > 0.0);
    // The cluster rows run wherever PostgreSQL is installed, and CI
    // installs it.
    let postgres = std::fs::read_dir("/usr/lib/postgresql").is_ok_and(|mut d| d.next().is_some());
    if postgres || std::env::var_os("LARDER_TEST_REQUIRE_POSTGRES").is_some() {
        let cluster = &report["cluster"];
        let rows = cluster["rows"].as_array().expect("cluster rows");
        assert_eq!(rows.len(), 3, "{cluster}");
        for row in rows {
            assert!(row["larder_rps"][0].as_f64().unwrap() > 0.0, "{row}");
            assert!(row["baseline_rps"][0].as_f64().unwrap() > 0.0, "{row}");
            assert_eq!(row["errors"], 0, "{row}");
        }
        let staleness = cluster["staleness"].as_array().expect("staleness");
        assert_eq!(staleness.len(), 2, "{cluster}");
        for s in staleness {
            assert!(s["samples"].as_u64().unwrap() > 0, "{s}");
            assert!(s["p99_ms"].as_f64().unwrap() >= s["p50_ms"].as_f64().unwrap());
        }
    } else {
        eprintln!("no PostgreSQL installed: the cluster rows were skipped");
    }
    let latency = report["latency"].as_array().expect("latency rows");
    assert_eq!(latency.len(), 3, "{latency:?}");
    for row in latency {
        for side in ["baseline_tail", "larder_tail"] {
            let t = &row[side];
            assert!(t["samples"].as_u64().unwrap() > 0, "{row}");
            assert_eq!(t["errors"], 0, "{row}");
            assert!(
                t["p99_us"].as_f64().unwrap() >= t["p50_us"].as_f64().unwrap(),
                "{row}"
            );
        }
    }
    let memory = report["memory"].as_array().unwrap();
    assert_eq!(memory.len(), 3);
    for m in memory {
        assert!(m["after_load_ratio"].as_f64().is_some(), "{m}");
        assert!(m["bytes_per_entry"].as_f64().is_some(), "{m}");
    }
    assert!(memory[1]["startup_ms"].as_u64().is_some());
    // Redis is the peer of the memory and start-up rows where it is
    // installed (the benchmark's setup installs it; CI does not need it).
    let redis = std::process::Command::new("which")
        .arg("redis-server")
        .output()
        .is_ok_and(|o| o.status.success());
    if redis {
        for m in memory {
            assert!(m["redis_bytes_per_entry"].as_f64().unwrap() > 0.0, "{m}");
        }
        assert!(memory[2]["redis_rdb_load_ms"].as_u64().is_some());
    } else {
        eprintln!("redis-server not installed: the memory rows ran without Redis");
    }
}
