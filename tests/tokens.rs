//! The token lifecycle: tokens stored as digests, read-only tokens, several
//! tokens per principal, reload on SIGHUP (new tokens work, removed ones get
//! 401 and their watch streams are revoked, a broken file keeps the old
//! set), and a tokens file without tokens refused at start.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};

use common::child::ChildServer;
use common::spawn_with;

fn hex_digest(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect()
}

/// Polls `check` until it holds, failing after 10 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not within 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn status(req: reqwest::RequestBuilder, token: &str) -> reqwest::StatusCode {
    req.bearer_auth(token).send().await.unwrap().status()
}

#[tokio::test]
async fn read_only_tokens_may_read_and_nothing_else() {
    let digest = hex_digest("reader-token-1");
    let app = spawn_with(move |c| {
        c.tokens = Some(format!(
            "admin:admin-token-1,alice:alice-token-1,alice:alice-token-2,reader:sha256:{digest}:read"
        ));
    })
    .await;
    let c = &app.client;
    // Both of alice's tokens are alice.
    for token in ["alice-token-1", "alice-token-2"] {
        let r = c
            .post(app.url("/v1/tables"))
            .bearer_auth(token)
            .json(&json!({"name": format!("t-{token}"), "access": "public"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let info: serde_json::Value = c
            .get(app.url(&format!("/v1/tables/t-{token}")))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(info["owner"], "alice");
    }
    let put = |key: &str| {
        c.put(app.entry_url("t-alice-token-1", key))
            .body(r#"{"n":1}"#)
    };
    assert_eq!(status(put("k"), "alice-token-1").await, 201);
    // The reader, known only by its token's digest, reads a public table...
    let get = c.get(app.entry_url("t-alice-token-1", "k"));
    assert_eq!(status(get, "reader-token-1").await, 200);
    let lookup = c
        .post(app.url("/v1/tables/t-alice-token-1/lookup"))
        .json(&json!({"keys": ["k"]}));
    assert_eq!(status(lookup, "reader-token-1").await, 200);
    let select = c
        .post(app.url("/v1/tables/t-alice-token-1/select"))
        .json(&json!({"match": "_"}));
    assert_eq!(status(select, "reader-token-1").await, 200);
    // ...and is refused every write and manage operation, even on a public
    // table, with nothing applied.
    let refused = [
        put("k2"),
        c.delete(app.entry_url("t-alice-token-1", "k")),
        c.post(app.url("/v1/tables/t-alice-token-1/entries/n/counter")),
        c.post(app.url("/v1/tables")).json(&json!({"name": "mine"})),
        c.delete(app.url("/v1/tables/t-alice-token-1")),
    ];
    for req in refused {
        let r = req.bearer_auth("reader-token-1").send().await.unwrap();
        assert_eq!(r.status(), 403);
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("read-only"),
            "{body}"
        );
    }
    let get = c.get(app.entry_url("t-alice-token-1", "k2"));
    assert_eq!(status(get, "alice-token-1").await, 404);
    let get = c.get(app.entry_url("t-alice-token-1", "k"));
    assert_eq!(status(get, "alice-token-1").await, 200);
    // The digest is not a token.
    let get = c.get(app.entry_url("t-alice-token-1", "k"));
    assert_eq!(status(get, &hex_digest("reader-token-1")).await, 401);
}

#[tokio::test]
async fn sighup_reloads_the_tokens_file_and_revokes_removed_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "admin:admin-token-1\nalice:alice-token-1\n").unwrap();
    let file_arg = file.to_str().unwrap().to_owned();
    let server = ChildServer::start_with(
        &dir.path().join("data"),
        &[("LARDER_TOKENS_FILE", &file_arg)],
    )
    .await;
    let c = reqwest::Client::new();
    let url = |path: &str| format!("{}{}", server.base, path);
    let r = c
        .post(url("/v1/tables"))
        .bearer_auth("alice-token-1")
        .json(&json!({"name": "w", "access": "public"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let mut watch = c
        .get(url("/v1/tables/w/watch"))
        .bearer_auth("alice-token-1")
        .send()
        .await
        .unwrap();
    assert_eq!(watch.status(), 200);

    // Alice's token goes, bob's comes (as a digest).
    let bobs_file = format!(
        "admin:admin-token-1\nbob:sha256:{}\n",
        hex_digest("bob-token-0001")
    );
    std::fs::write(&file, &bobs_file).unwrap();
    server.signal("HUP");
    eventually("bob's new token works", async || {
        status(c.get(url("/v1/tables/w")), "bob-token-0001").await == 200
    })
    .await;
    assert_eq!(
        status(c.get(url("/v1/tables/w")), "alice-token-1").await,
        401
    );
    // Alice's stream, opened with the removed token, is revoked.
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !text.contains("event: revoked") {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.chunk()).await {
            Ok(Ok(Some(bytes))) => text.push_str(&String::from_utf8_lossy(&bytes)),
            other => panic!("the stream ended without event: revoked: {other:?} {text:?}"),
        }
    }
    let reload_metric = async || {
        c.get(url("/metrics"))
            .bearer_auth("admin-token-1")
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            .lines()
            .find(|l| l.starts_with("larder_reload_success{what=\"tokens\"}"))
            .map(str::to_owned)
    };
    assert_eq!(
        reload_metric().await.as_deref(),
        Some("larder_reload_success{what=\"tokens\"} 1")
    );

    // A broken file and an empty one are refused: the old set stays.
    for broken in ["admin:admin-token-1\nbroken line\n", "# nothing here\n"] {
        std::fs::write(&file, broken).unwrap();
        server.signal("HUP");
        eventually("the reload is refused", async || {
            reload_metric().await.as_deref() == Some("larder_reload_success{what=\"tokens\"} 0")
        })
        .await;
        assert_eq!(
            status(c.get(url("/v1/tables/w")), "bob-token-0001").await,
            200
        );
        // Back to success, so the next round sees its own refusal.
        std::fs::write(&file, &bobs_file).unwrap();
        server.signal("HUP");
        eventually("the good file is taken again", async || {
            reload_metric().await.as_deref() == Some("larder_reload_success{what=\"tokens\"} 1")
        })
        .await;
    }
    assert!(server.log_text().contains("tokens file refused"));
    assert!(!server.log_text().contains("bob-token-0001"));
}

#[tokio::test]
async fn a_tokens_file_without_tokens_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# every line commented out\n\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_clear()
        .envs(common::child::clean_env())
        .env("LARDER_TOKENS_FILE", &file)
        .output()
        .expect("larder runs");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("holds no token"), "{said}");
}
