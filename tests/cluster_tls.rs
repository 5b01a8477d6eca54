//! Cluster tables over TLS: a real PostgreSQL with `ssl=on` whose rules
//! refuse every TCP connection not made over TLS, reached with each of
//! libpq's `sslmode`s. The server's certificate names `db.internal` only,
//! so `verify-full` holds when the URL names that host (with `hostaddr`
//! pointing at 127.0.0.1) and fails for `127.0.0.1`, while `verify-ca`
//! and `require` pass; a root of another CA fails `verify-*`.

mod common;

use larder::app::App;
use larder::config::Config;
use serde_json::json;

use common::certs::Ca;
use common::pg::PgServer;
use common::{spawn_with, TestApp};

/// Whether a cluster table can be created and used through `app`; the
/// status of the create otherwise.
async fn cluster_works(app: &TestApp, table: &str) -> Result<(), u16> {
    let r = app
        .create_table(json!({"name": table, "persistence": "cluster"}))
        .await;
    if r.status != 201 {
        return Err(r.status.as_u16());
    }
    let r = app.put(table, "k", json!({"over": "tls"})).await;
    assert!(r.status.is_success(), "{:?}", r.body);
    let r = app.get(table, "k").await;
    assert_eq!(r.body["value"], json!({"over": "tls"}));
    Ok(())
}

/// larder's sessions in PostgreSQL's view: (encrypted, plain).
async fn sessions(admin: &tokio_postgres::Client) -> (i64, i64) {
    let row = admin
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl) \
             FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = 'larder'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn cluster_tables_reach_postgresql_over_tls_with_each_sslmode() {
    let ca = Ca::new("database CA");
    let (cert, key) = ca.leaf("db", &["db.internal"], false);
    let Some(pg) = PgServer::start_tls(&cert, &key) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    std::fs::write(&root, ca.pem()).unwrap();
    let root = root.to_str().unwrap().to_owned();
    let foreign = dir.path().join("foreign.pem");
    std::fs::write(&foreign, Ca::new("other CA").pem()).unwrap();
    let foreign = foreign.to_str().unwrap().to_owned();
    pg.create_db("tlsdb").await;
    let by_ip = format!("postgres://larder@127.0.0.1:{}/tlsdb", pg.port);
    let by_name = format!(
        "postgres://larder@db.internal:{}/tlsdb?hostaddr=127.0.0.1",
        pg.port
    );

    // The rules refuse plain TCP: sslmode=disable cannot connect, and
    // PostgreSQL says why (start-up is refused, as for any rejection).
    let data = tempfile::tempdir().unwrap();
    let mut config = Config::for_tests(data.path().join("data"));
    config.cluster_url = Some(format!("{by_ip}?sslmode=disable"));
    let refused = App::build(config).await.err().expect("plain TCP refused");
    let why = refused.to_string();
    assert!(
        why.contains("pg_hba.conf") || why.contains("SSL off"),
        "{why}"
    );

    let passing = [
        ("prefer (the default)", by_ip.clone()),
        ("require", format!("{by_ip}?sslmode=require")),
        (
            "verify-ca",
            format!("{by_ip}?sslmode=verify-ca&sslrootcert={root}"),
        ),
        (
            "verify-full",
            format!("{by_name}&sslmode=verify-full&sslrootcert={root}"),
        ),
    ];
    for (i, (mode, url)) in passing.into_iter().enumerate() {
        let app = spawn_with(|c| c.cluster_url = Some(url)).await;
        let table = format!("t{i}");
        assert_eq!(cluster_works(&app, &table).await, Ok(()), "{mode}");
    }

    let failing = [
        (
            "verify-full for a name the certificate does not hold",
            format!("{by_ip}?sslmode=verify-full&sslrootcert={root}"),
        ),
        (
            "verify-ca with another CA's root",
            format!("{by_ip}?sslmode=verify-ca&sslrootcert={foreign}"),
        ),
        (
            "require with another CA's root (libpq verifies then)",
            format!("{by_ip}?sslmode=require&sslrootcert={foreign}"),
        ),
    ];
    for (mode, url) in failing {
        let app = spawn_with(|c| c.cluster_url = Some(url)).await;
        assert_eq!(cluster_works(&app, "never").await, Err(503), "{mode}");
    }

    // Every connection larder made was encrypted (the rules would have
    // refused any other; PostgreSQL's own view says the same).
    let admin = pg.client("tlsdb").await;
    let (encrypted, plain) = sessions(&admin).await;
    assert_eq!(plain, 0);
    // The apps above have stopped; their sessions may be gone. A live one
    // shows its own sessions encrypted.
    let app = spawn_with(|c| c.cluster_url = Some(format!("{by_ip}?sslmode=require"))).await;
    assert_eq!(cluster_works(&app, "live").await, Ok(()));
    let (encrypted_now, plain_now) = sessions(&admin).await;
    assert!(encrypted_now > 0, "{encrypted} then {encrypted_now}");
    assert_eq!(plain_now, 0);
}
