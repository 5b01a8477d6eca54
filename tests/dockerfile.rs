//! The Dockerfile runs what `cargo build --release` produces, the way the
//! README says. No Docker engine runs here, so this reads the file; CI also
//! lints it with hadolint.

mod common;

use std::process::Command;

fn dockerfile() -> Vec<String> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Dockerfile")).unwrap();
    // Join continuation lines, drop comments.
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    lines
}

fn find<'a>(lines: &'a [String], instruction: &str) -> Vec<&'a str> {
    lines
        .iter()
        .filter_map(|l| l.strip_prefix(instruction).map(str::trim))
        .collect()
}

#[test]
fn the_image_runs_the_release_binary_that_cargo_builds() {
    let lines = dockerfile();
    let froms = find(&lines, "FROM ");
    assert_eq!(froms.len(), 2, "multi-stage: build and run");
    assert!(
        froms[0].starts_with("rust:") && froms[0].ends_with("AS build"),
        "{}",
        froms[0]
    );
    assert!(froms[1].contains("slim"), "slim runtime base: {}", froms[1]);

    let runs = find(&lines, "RUN ");
    assert!(runs
        .iter()
        .any(|r| r.contains("cargo build --release") && r.contains("--bin larder")));
    // The build stage copies every input the crate needs, and .dockerignore
    // excludes none of them.
    let copies = find(&lines, "COPY ");
    let ignore =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.dockerignore")).unwrap();
    for input in ["Cargo.toml", "Cargo.lock", "src", "migrations"] {
        assert!(
            copies.iter().any(|c| c
                .split_whitespace()
                .any(|w| w.trim_end_matches('/') == input)),
            "{input} not copied"
        );
        assert!(
            !ignore.lines().any(|l| l.trim() == input),
            "{input} is dockerignored"
        );
    }
    // What the runtime stage runs is exactly target/release/larder, the file
    // cargo builds for the `larder` binary.
    let built = std::path::Path::new(env!("CARGO_BIN_EXE_larder"));
    assert_eq!(built.file_name().unwrap(), "larder");
    let copy = copies
        .iter()
        .find(|c| c.starts_with("--from=build"))
        .expect("the runtime stage copies from the build stage");
    let parts: Vec<&str> = copy.split_whitespace().collect();
    assert_eq!(parts[1], "/src/target/release/larder");
    let installed = parts[2];
    let entry = find(&lines, "ENTRYPOINT ")[0];
    assert_eq!(entry, format!("[\"{installed}\"]"));
    let health = find(&lines, "HEALTHCHECK ")[0];
    assert!(
        health.contains(&format!("[\"{installed}\", \"--healthcheck\"]")),
        "{health}"
    );

    let user = find(&lines, "USER ")[0];
    assert!(
        !user.starts_with("0") && !user.starts_with("root"),
        "non-root: {user}"
    );
    assert_eq!(find(&lines, "STOPSIGNAL "), ["SIGTERM"]);
    assert_eq!(find(&lines, "VOLUME "), ["[\"/data\"]"]);
    let env = find(&lines, "ENV ").join(" ");
    assert!(
        env.contains("LARDER_LISTEN=0.0.0.0:8080") && env.contains("LARDER_DATA_DIR=/data"),
        "{env}"
    );
    // The healthcheck and outside probes reach the admin listener.
    assert!(env.contains("LARDER_ADMIN_LISTEN=0.0.0.0:9090"), "{env}");
    assert!(find(&lines, "EXPOSE ")[0]
        .split_whitespace()
        .any(|p| p == "9090"));
}

#[tokio::test]
async fn the_healthcheck_flag_tells_up_from_down() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::child::ChildServer::start(dir.path()).await;
    let addr = server.base.trim_start_matches("http://").to_owned();
    let up = Command::new(env!("CARGO_BIN_EXE_larder"))
        .env_clear()
        .envs(common::child::clean_env())
        .args(["--healthcheck", "--listen", &addr])
        .status()
        .unwrap();
    assert!(up.success());
    drop(server);
    let down = Command::new(env!("CARGO_BIN_EXE_larder"))
        .env_clear()
        .envs(common::child::clean_env())
        .args(["--healthcheck", "--listen", &addr])
        .status()
        .unwrap();
    assert!(!down.success());
}
