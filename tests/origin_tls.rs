//! Read-through from an `https://` origin: the origin's certificate is
//! verified against the system roots plus `--origin-ca`. With the CA given
//! the miss is fetched and stored; without it the fetch fails (502) and
//! nothing is stored; a bad `--origin-ca` stops start-up.
//!
//! The origin is a small TLS server made here, with a certificate generated
//! at run time for 127.0.0.1 (no key is ever committed).

mod common;

use std::sync::Arc;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;

use common::spawn_with;

/// A TLS origin answering every request with `body`; returns its port and
/// the PEM of its certificate.
async fn tls_origin(body: &'static str) -> (u16, String) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let cert_pem = made.cert.pem();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(made.key_pair.serialize_der().into());
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![made.cert.der().clone()], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                // A client that refuses the certificate ends here.
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, cert_pem)
}

#[tokio::test]
async fn an_https_origin_is_read_through_when_its_ca_is_trusted() {
    let (port, cert_pem) = tls_origin(r#"{"from":"tls"}"#).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("origin-ca.pem");
    std::fs::write(&ca, &cert_pem).unwrap();
    let origin = json!({"url": format!("https://127.0.0.1:{port}/items/{{key}}"), "ttl_ms": 60000});

    let trusted = spawn_with(|c| {
        c.origin_allow = vec!["127.0.0.1:*".into()];
        c.origin_ca = Some(ca.clone());
    })
    .await;
    let r = trusted
        .create_table(json!({"name": "t", "origin": origin}))
        .await;
    assert_eq!(r.status, 201, "{:?}", r.body);
    let got = trusted.get("t", "a").await;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.body["value"], json!({"from": "tls"}));

    // The same origin without its CA: the handshake is refused, 502, and
    // nothing is stored.
    let untrusted = spawn_with(|c| c.origin_allow = vec!["127.0.0.1:*".into()]).await;
    let r = untrusted
        .create_table(json!({"name": "t", "origin": origin}))
        .await;
    assert_eq!(r.status, 201);
    let got = untrusted.get("t", "a").await;
    assert_eq!(got.status, 502, "{:?}", got.body);
    assert_eq!(got.body["error"]["code"], "origin_error");
    assert_eq!(untrusted.get("t", "a").await.status, 502, "not cached");
}

#[tokio::test]
async fn a_bad_origin_ca_stops_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    for path in [junk, dir.path().join("missing.pem")] {
        let mut config = larder::config::Config::for_tests(dir.path().join("data"));
        config.origin_ca = Some(path.clone());
        let err = larder::app::App::build(config)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("--origin-ca"), "{err}");
        assert!(
            err.contains(&path.display().to_string()),
            "names the file: {err}"
        );
    }
}
