//! The admin listener (`--admin-listen`): `/healthz`, `/readyz` and
//! `/metrics` over plain HTTP without a token while the main listener
//! requires one, nothing else served there, and `--healthcheck` asking it.

mod common;

use std::process::Command;

use common::spawn_with;

#[tokio::test]
async fn probes_and_metrics_answer_without_a_token_on_the_admin_address_only() {
    let app = spawn_with(|c| {
        c.tokens = Some("admin:admin-token-1,alice:alice-token-1".into());
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = format!("http://{}", app.admin.expect("admin listener bound"));
    let c = &app.client;
    // A private table of alice's: its series show on the admin listener,
    // which answers as the admin principal.
    let r = c
        .post(app.url("/v1/tables"))
        .bearer_auth("alice-token-1")
        .json(&serde_json::json!({"name": "secret", "access": "private"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);

    assert_eq!(
        c.get(app.url("/metrics")).send().await.unwrap().status(),
        401
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = c.get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let metrics = c
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("table=\"secret\""), "every table shows");
    assert!(metrics.contains("larder_background_tasks"));
    // Nothing else is served there.
    for path in ["/v1/tables", "/v1/tables/secret", "/docs", "/openapi.json"] {
        let r = c
            .get(format!("{admin}{path}"))
            .bearer_auth("admin-token-1")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
}

#[tokio::test]
async fn the_admin_listener_is_capped_and_makes_room_for_probes() {
    let app = spawn_with(|c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
        c.admin_max_connections = 2;
    })
    .await;
    let admin = app.admin.expect("admin listener bound");
    // Two idle connections fill the cap.
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    let metric = |text: &str, name: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
    };
    // A probe still gets through: the longest idle connection is closed
    // to make room, and the cap holds.
    for _ in 0..5 {
        let r = reqwest::Client::new()
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let text = r.text().await.unwrap();
        assert_eq!(metric(&text, "larder_admin_connections_max"), Some(2.0));
        let open = metric(&text, "larder_admin_connections_open").unwrap();
        assert!((1.0..=2.0).contains(&open), "{open}");
    }
}

// Multi-threaded: the healthcheck process is waited for in a blocking
// call, while the server in this process must answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_asks_the_admin_listener_when_there_is_one() {
    let app = spawn_with(|c| {
        c.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let admin = app.admin.unwrap().to_string();
    // The main address given is closed: only the admin one can answer.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().to_string();
    drop(closed);
    let check = |admin_listen: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_larder"));
        cmd.env_clear().envs(common::child::clean_env()).args([
            "--healthcheck",
            "--listen",
            &nowhere,
        ]);
        if let Some(a) = admin_listen {
            cmd.args(["--admin-listen", a]);
        }
        cmd.status().unwrap().success()
    };
    assert!(check(Some(&admin)));
    assert!(!check(None));
}
