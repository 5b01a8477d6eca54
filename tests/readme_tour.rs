//! The README's curl tour, run as written against a real server: every
//! command's output must be exactly what the README says it prints.

mod common;

use common::spawn_app;

/// `(command, expected output)` pairs from the README's tour block.
fn tour() -> Vec<(String, String)> {
    let readme = include_str!("../README.md");
    let start = readme
        .find("<!-- tour:start -->")
        .expect("tour start marker");
    let end = readme.find("<!-- tour:end -->").expect("tour end marker");
    let mut steps: Vec<(String, String)> = Vec::new();
    let mut in_block = false;
    for line in readme[start..end].lines() {
        if line.starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if !in_block {
            continue;
        }
        if let Some(cmd) = line.strip_prefix("$ ") {
            steps.push((cmd.to_owned(), String::new()));
        } else if let Some((_, out)) = steps.last_mut() {
            out.push_str(line);
            out.push('\n');
        }
    }
    steps
}

#[tokio::test]
async fn the_readme_tour_prints_what_it_says() {
    let app = spawn_app().await;
    let steps = tour();
    assert!(steps.len() >= 15, "the tour has its steps");
    for (cmd, expected) in steps {
        let real = cmd.replace("localhost:8080", &app.addr.to_string());
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&real)
            .output()
            .await
            .expect("sh runs");
        assert!(
            out.status.success(),
            "{cmd} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut got = String::from_utf8_lossy(&out.stdout).into_owned();
        if !got.ends_with('\n') {
            got.push('\n');
        }
        assert_eq!(got, expected, "output of: {cmd}");
    }
}
