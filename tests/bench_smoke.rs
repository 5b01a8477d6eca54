//! The benchmark, as a short smoke run: it starts the server, drives every
//! row, measures memory and start-up, and writes its JSON. Nothing here
//! judges speed; the numbers come from full runs on a quiet machine.

use std::process::Command;

#[test]
fn the_benchmark_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bench.json");
    let run = Command::new(env!("CARGO_BIN_EXE_larder-bench"))
        .env_clear()
        .envs(std::env::vars().filter(|(k, _)| !k.starts_with("LARDER_")))
        .args([
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--connections",
            "8",
        ])
        .args([
            "--keys",
            "500",
            "--memory-entries",
            "2000",
            "--startup-entries",
            "2000",
        ])
        .arg("--server-bin")
        .arg(env!("CARGO_BIN_EXE_larder"))
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
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 10);
    assert_eq!(rows[0]["name"], "noop");
    for row in rows {
        assert!(row["requests"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["errors"], 0, "{row}");
        assert!(row["ratio"].as_f64().unwrap() > 0.0, "{row}");
    }
    assert!(rows
        .iter()
        .any(|r| r["writes_per_fsync"].as_f64().is_some()));
    assert!(report["resident_bytes_per_entry"].as_f64().unwrap() > 0.0);
    assert!(report["startup_ms"].as_u64().is_some());
    assert_eq!(report["targets"].as_array().unwrap().len(), 9);
}
