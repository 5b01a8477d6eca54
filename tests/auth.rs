//! Principals and per-table access: the full authorization matrix, table
//! listings and metrics filtered per principal, give-away, and the rules for
//! running with authentication off.

mod common;

use common::{spawn_with, TestApp};
use larder::app::App;
use larder::config::Config;
use reqwest::Method;
use serde_json::json;

const OWNER: &str = "ownertoken-1";
const OTHER: &str = "othertoken-1";
const ADMIN: &str = "admintoken-1";

async fn app() -> TestApp {
    spawn_with(|c| {
        c.tokens = Some(format!("owner:{OWNER},other:{OTHER},admin:{ADMIN}"));
    })
    .await
}

async fn call(
    app: &TestApp,
    token: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&str>,
) -> u16 {
    let mut req = app.client.request(method, app.url(path));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.body(b.to_owned());
    }
    req.send().await.unwrap().status().as_u16()
}

/// Drops and re-creates `t` as the owner with `access`, seeded with keys.
async fn fresh_table(app: &TestApp, access: &str) {
    call(app, Some(ADMIN), Method::DELETE, "/v1/tables/t", None).await;
    let body = json!({"name": "t", "access": access}).to_string();
    assert_eq!(
        call(app, Some(OWNER), Method::POST, "/v1/tables", Some(&body)).await,
        201
    );
    for (k, v) in [("k", "1"), ("obj", r#"{"a":1}"#), ("num", "5")] {
        let path = format!("/v1/tables/t/entries/{k}");
        assert_eq!(
            call(app, Some(OWNER), Method::PUT, &path, Some(v)).await,
            201
        );
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Needs {
    Read,
    Write,
    Manage,
}

#[tokio::test]
async fn the_authorization_matrix_holds_for_every_endpoint() {
    let app = app().await;
    let endpoints: Vec<(Method, &str, Option<&str>, Needs, u16)> = vec![
        (Method::GET, "/v1/tables/t", None, Needs::Read, 200),
        (
            Method::GET,
            "/v1/tables/t/entries/k",
            None,
            Needs::Read,
            200,
        ),
        (
            Method::HEAD,
            "/v1/tables/t/entries/k",
            None,
            Needs::Read,
            200,
        ),
        (Method::GET, "/v1/tables/t/entries", None, Needs::Read, 200),
        (
            Method::PUT,
            "/v1/tables/t/entries/k",
            Some("2"),
            Needs::Write,
            200,
        ),
        (
            Method::DELETE,
            "/v1/tables/t/entries/k",
            None,
            Needs::Write,
            204,
        ),
        (
            Method::POST,
            "/v1/tables/t/entries/k/delete_object",
            Some("1"),
            Needs::Write,
            204,
        ),
        (
            Method::POST,
            "/v1/tables/t/entries/k/take",
            None,
            Needs::Write,
            200,
        ),
        (
            Method::PATCH,
            "/v1/tables/t/entries/obj",
            Some(r#"{"b":2}"#),
            Needs::Write,
            200,
        ),
        (
            Method::POST,
            "/v1/tables/t/entries/num/counter",
            Some("{}"),
            Needs::Write,
            200,
        ),
        (
            Method::POST,
            "/v1/tables/t/entries",
            Some(r#"[{"key":"n","value":1}]"#),
            Needs::Write,
            200,
        ),
        (
            Method::DELETE,
            "/v1/tables/t/entries",
            None,
            Needs::Write,
            204,
        ),
        (Method::POST, "/v1/tables/t/sync", None, Needs::Write, 200),
        (
            Method::POST,
            "/v1/tables/t/select",
            Some("{}"),
            Needs::Read,
            200,
        ),
        (Method::GET, "/v1/tables/t/export", None, Needs::Read, 200),
        (Method::GET, "/v1/tables/t/watch", None, Needs::Read, 200),
        (
            Method::POST,
            "/v1/tables/t/select_count",
            Some("{}"),
            Needs::Read,
            200,
        ),
        (
            Method::POST,
            "/v1/tables/t/lookup",
            Some(r#"{"keys":["k"]}"#),
            Needs::Read,
            200,
        ),
        (
            Method::POST,
            "/v1/tables/t/select_delete",
            Some(r#"{"match":{"key":"k"}}"#),
            Needs::Write,
            200,
        ),
        (
            Method::PATCH,
            "/v1/tables/t",
            Some(r#"{"default_ttl_ms":1000}"#),
            Needs::Manage,
            200,
        ),
        (
            Method::POST,
            "/v1/tables/t/give_away",
            Some(r#"{"to":"other"}"#),
            Needs::Manage,
            200,
        ),
        (Method::DELETE, "/v1/tables/t", None, Needs::Manage, 204),
    ];
    let mut checked = 0;
    for access in ["public", "protected", "private"] {
        for (method, path, body, needs, ok) in &endpoints {
            for (who, token) in [
                ("owner", Some(OWNER)),
                ("other", Some(OTHER)),
                ("admin", Some(ADMIN)),
                ("no token", None),
                ("wrong token", Some("not-a-real-token")),
            ] {
                fresh_table(&app, access).await;
                let allowed_for_other = match (access, needs) {
                    (_, Needs::Manage) => false,
                    ("public", _) => true,
                    ("protected", Needs::Read) => true,
                    _ => false,
                };
                let expected = match who {
                    "owner" | "admin" => *ok,
                    "other" if allowed_for_other => *ok,
                    "other" => 403,
                    _ => 401,
                };
                let got = call(&app, token, method.clone(), path, *body).await;
                assert_eq!(got, expected, "{who} {method} {path} on a {access} table");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 3 * 22 * 5);
}

#[tokio::test]
async fn listings_and_metrics_show_only_readable_tables() {
    let app = app().await;
    for (name, access) in [
        ("pub", "public"),
        ("prot", "protected"),
        ("priv", "private"),
    ] {
        let body = json!({"name": name, "access": access}).to_string();
        assert_eq!(
            call(&app, Some(OWNER), Method::POST, "/v1/tables", Some(&body)).await,
            201
        );
    }
    let list = |token: &'static str| {
        let app = &app;
        async move {
            let r = app
                .client
                .get(app.url("/v1/tables"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            let body: serde_json::Value = r.json().await.unwrap();
            let mut names: Vec<String> = body["tables"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["name"].as_str().unwrap().to_owned())
                .collect();
            names.sort();
            names
        }
    };
    assert_eq!(list(OWNER).await, ["priv", "prot", "pub"]);
    assert_eq!(list(ADMIN).await, ["priv", "prot", "pub"]);
    assert_eq!(list(OTHER).await, ["prot", "pub"]);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .bearer_auth(OTHER)
        .send()
        .await
        .unwrap();
    let text = metrics.text().await.unwrap();
    assert!(text.contains(r#"larder_table_objects{table="pub"}"#));
    assert!(
        !text.contains(r#"table="priv""#),
        "private table hidden from others"
    );
    assert_eq!(call(&app, None, Method::GET, "/metrics", None).await, 401);
    let unauthorized = app.client.get(app.url("/v1/tables")).send().await.unwrap();
    assert_eq!(unauthorized.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = unauthorized.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    // Probes and docs need no token.
    for path in ["/healthz", "/readyz", "/openapi.json", "/docs/"] {
        assert_eq!(
            call(&app, None, Method::GET, path, None).await,
            200,
            "{path}"
        );
    }
}

#[tokio::test]
async fn the_creator_owns_and_give_away_moves_ownership() {
    let app = app().await;
    let body = json!({"name": "g", "access": "protected"}).to_string();
    call(&app, Some(OWNER), Method::POST, "/v1/tables", Some(&body)).await;
    let info = app
        .client
        .get(app.url("/v1/tables/g"))
        .bearer_auth(OTHER)
        .send()
        .await
        .unwrap();
    assert_eq!(
        info.json::<serde_json::Value>().await.unwrap()["owner"],
        "owner"
    );
    assert_eq!(
        call(
            &app,
            Some(OTHER),
            Method::PUT,
            "/v1/tables/g/entries/k",
            Some("1")
        )
        .await,
        403
    );
    assert_eq!(
        call(
            &app,
            Some(OWNER),
            Method::POST,
            "/v1/tables/g/give_away",
            Some(r#"{"to":"nobody"}"#)
        )
        .await,
        400,
        "only configured principals"
    );
    assert_eq!(
        call(
            &app,
            Some(OWNER),
            Method::POST,
            "/v1/tables/g/give_away",
            Some(r#"{"to":"other"}"#)
        )
        .await,
        200
    );
    assert_eq!(
        call(
            &app,
            Some(OTHER),
            Method::PUT,
            "/v1/tables/g/entries/k",
            Some("1")
        )
        .await,
        201
    );
    assert_eq!(
        call(
            &app,
            Some(OWNER),
            Method::PUT,
            "/v1/tables/g/entries/k",
            Some("2")
        )
        .await,
        403
    );
}

#[tokio::test]
async fn only_admins_create_tables_with_an_origin() {
    let app = spawn_with(|c| {
        c.tokens = Some(format!("owner:{OWNER},admin:{ADMIN}"));
        c.origin_allow = vec!["127.0.0.1:*".into()];
    })
    .await;
    let body = json!({"name": "o", "origin": {"url": "http://127.0.0.1:9/u/{key}"}}).to_string();
    assert_eq!(
        call(&app, Some(OWNER), Method::POST, "/v1/tables", Some(&body)).await,
        403
    );
    assert_eq!(
        call(&app, Some(ADMIN), Method::POST, "/v1/tables", Some(&body)).await,
        201
    );
}

#[tokio::test]
async fn without_tokens_the_server_refuses_public_addresses_unless_told() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(dir.path());
    config.listen = "0.0.0.0:0".parse().unwrap();
    let err = App::build(config.clone())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("--allow-insecure-public"), "{err}");
    config.allow_insecure_public = true;
    assert!(App::build(config.clone()).await.is_ok());
    config.allow_insecure_public = false;
    config.tokens = Some("alice:alicetoken1".into());
    assert!(
        App::build(config).await.is_ok(),
        "with tokens any address is fine"
    );
}

#[tokio::test]
async fn bad_token_configuration_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, "# comment\nalice:alicetoken1\nbroken line\n").unwrap();
    let mut config = Config::for_tests(dir.path().join("data"));
    config.tokens_file = Some(file.clone());
    let err = App::build(config).await.err().expect("refused").to_string();
    assert!(
        err.contains(":3") && err.contains("principal:token"),
        "{err}"
    );
    assert!(
        !err.contains("alicetoken1"),
        "tokens never appear in messages"
    );
}
