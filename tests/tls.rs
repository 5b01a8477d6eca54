//! HTTPS on the listener: HTTP/1.1 and HTTP/2 by ALPN, plain HTTP and
//! broken handshakes closed, the pair reloaded on `SIGHUP` while open
//! connections carry on, a bad pair refused at start (exit 2) and at
//! reload (the old one stays), and mutual TLS naming the principal.
//!
//! Every certificate is made here at run time; no key is committed.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use larder::app::App;
use larder::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use common::certs::Ca;
use common::child::ChildServer;

/// Writes `text` to `path` in one step (a reload never sees half a file).
fn put_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The server pair and CA files of one test.
struct Files {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl Files {
    fn new(ca: &Ca) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let files = Files {
            cert: dir.path().join("server.pem"),
            key: dir.path().join("server.key"),
            client_ca: dir.path().join("clients.pem"),
            _dir: dir,
        };
        files.install(ca);
        files
    }

    /// Puts a fresh server pair signed by `ca` in place.
    fn install(&self, ca: &Ca) {
        let (cert, key) = ca.leaf("larder", &["127.0.0.1"], false);
        put_file(&self.cert, &cert);
        put_file(&self.key, &key);
    }
}

/// A reqwest client trusting only `ca`, optionally presenting `identity`
/// (certificate and key PEM).
fn client(ca: &Ca, identity: Option<&(String, String)>, http1_only: bool) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes()).unwrap())
        .timeout(Duration::from_secs(10));
    if let Some((cert, key)) = identity {
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    if http1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

/// An in-process server speaking HTTPS.
struct Server {
    addr: SocketAddr,
    admin: Option<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    _data: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl Server {
    async fn start(files: &Files, mutual: bool, tweak: impl FnOnce(&mut Config)) -> Server {
        let data = tempfile::tempdir().unwrap();
        let mut config = Config::for_tests(data.path().join("data"));
        config.tls_cert = Some(files.cert.clone());
        config.tls_key = Some(files.key.clone());
        if mutual {
            config.tls_client_ca = Some(files.client_ca.clone());
        }
        tweak(&mut config);
        let app = App::build(config).await.expect("server builds");
        let addr = app.local_addr().unwrap();
        let admin = app.admin_addr();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = app
                .run_until_stopped(async {
                    let _ = rx.await;
                })
                .await;
        });
        Server {
            addr,
            admin,
            stop: Some(tx),
            _data: data,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr)
    }
}

/// Polls `check` until it holds, for up to 20 seconds.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ready(client: &reqwest::Client, base: &str) {
    eventually("the server to be ready", async || {
        client
            .get(format!("{base}/readyz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test]
async fn https_serves_http1_and_http2_as_alpn_chooses() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca);
    let server = Server::start(&files, false, |_| {}).await;
    let h2 = client(&ca, None, false);
    ready(&h2, &server.url("")).await;

    let r = h2
        .post(server.url("/v1/tables"))
        .json(&json!({"name": "t"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 201);
    let r = h2
        .put(server.url("/v1/tables/t/entries/k"))
        .json(&json!({"a": 1}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());

    let h1 = client(&ca, None, true);
    let r = h1
        .get(server.url("/v1/tables/t/entries/k"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_11);
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["value"], json!({"a": 1}));

    // Many requests at once on one HTTP/2 connection.
    let gets = (0..50).map(|_| h2.get(server.url("/v1/tables/t/entries/k")).send());
    for r in futures_util::future::join_all(gets).await {
        let r = r.unwrap();
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);
    }

    // A client that trusts another CA refuses the server.
    let stranger = client(&Ca::new("other CA"), None, false);
    assert!(stranger.get(server.url("/healthz")).send().await.is_err());
}

/// Reads from `stream` until it ends (or 10 s pass) and returns the bytes.
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return got,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open"),
        }
    }
}

#[tokio::test]
async fn plain_http_and_broken_handshakes_on_the_tls_port_are_closed() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca);
    let server = Server::start(&files, false, |c| {
        c.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let tls = client(&ca, None, false);
    ready(&tls, &server.url("")).await;

    // Plain HTTP on the TLS port: never served.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_close(&mut plain).await;
    assert!(
        !got.starts_with(b"HTTP/"),
        "plain HTTP was answered: {:?}",
        String::from_utf8_lossy(&got)
    );

    // A handshake cut short: a record header promising more, then EOF.
    let mut cut = TcpStream::connect(server.addr).await.unwrap();
    cut.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00])
        .await
        .unwrap();
    cut.shutdown().await.unwrap();
    read_to_close(&mut cut).await;

    // A TLS hello on the plain admin port: closed too.
    let admin = server.admin.expect("admin listener");
    let plain_client = reqwest::Client::builder()
        .use_rustls_tls()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert!(plain_client
        .get(format!("https://{admin}/healthz"))
        .send()
        .await
        .is_err());

    // Nothing else happened: both listeners serve.
    let r = tls.get(server.url("/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::get(format!("http://{admin}/healthz"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// One HTTP/1.1 connection over TLS, kept open across requests.
struct RawTls {
    stream: tokio_rustls::client::TlsStream<TcpStream>,
}

impl RawTls {
    async fn open(addr: SocketAddr, ca: &Ca) -> RawTls {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.cert.der().clone()).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(larder::net::tls::provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::from(addr.ip());
        let stream = connector.connect(name, tcp).await.unwrap();
        RawTls { stream }
    }

    /// Sends `GET path` and returns the status line.
    async fn get(&mut self, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: larder\r\n\r\n");
        self.stream.write_all(request.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let (head_len, length) = loop {
            let n = self.stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed");
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_lowercase();
                let length = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                break (end + 4, length);
            }
        };
        while got.len() < head_len + length {
            let n = self.stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "the connection closed");
            got.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&got)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

async fn reload_metric(client: &reqwest::Client, base: &str) -> Option<f64> {
    let text = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("larder_reload_success{what=\"tls\"} "))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test]
async fn sighup_reloads_the_pair_and_open_connections_carry_on() {
    let first = Ca::new("first CA");
    let files = Files::new(&first);
    let data = tempfile::tempdir().unwrap();
    let cert = files.cert.to_str().unwrap().to_owned();
    let key = files.key.to_str().unwrap().to_owned();
    let server = ChildServer::launch(
        data.path(),
        &[("LARDER_TLS_CERT", &cert), ("LARDER_TLS_KEY", &key)],
        &[],
    );
    let base = server.base.replace("http://", "https://");
    let addr: SocketAddr = base.trim_start_matches("https://").parse().unwrap();
    let old_client = client(&first, None, false);
    ready(&old_client, &base).await;

    let mut open = RawTls::open(addr, &first).await;
    assert!(open.get("/healthz").await.contains(" 200 "));

    // A new pair from another CA; then SIGHUP.
    let second = Ca::new("second CA");
    files.install(&second);
    server.signal("HUP");
    let new_client = client(&second, None, false);
    eventually("new handshakes to use the new pair", async || {
        new_client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok()
    })
    .await;
    assert_eq!(reload_metric(&new_client, &base).await, Some(1.0));
    // The connection opened before the reload carries on.
    assert!(open.get("/healthz").await.contains(" 200 "));
    assert!(open.get("/readyz").await.contains(" 200 "));
    // New handshakes no longer use the old pair.
    let fresh_old = client(&first, None, false);
    assert!(fresh_old
        .get(format!("{base}/healthz"))
        .send()
        .await
        .is_err());

    // A broken pair: a key that is not PEM. Logged, refused, the second
    // pair stays in force.
    put_file(&files.key, "not a key\n");
    server.signal("HUP");
    eventually("the refused reload to show in /metrics", async || {
        reload_metric(&new_client, &base).await == Some(0.0)
    })
    .await;
    let r = new_client.get(format!("{base}/healthz")).send().await;
    assert_eq!(r.unwrap().status(), 200);
    // A key of another certificate is refused too.
    let (_, stray_key) = second.leaf("stray", &["127.0.0.1"], false);
    put_file(&files.key, &stray_key);
    let (cert_ok, _) = second.leaf("larder", &["127.0.0.1"], false);
    put_file(&files.cert, &cert_ok);
    server.signal("HUP");
    let logs_say = || {
        server
            .log_text()
            .lines()
            .filter(|l| l.contains("TLS pair refused"))
            .count()
    };
    eventually("the mismatched pair to be refused", async || {
        logs_say() >= 2
    })
    .await;
    let r = client(&second, None, false)
        .get(format!("{base}/healthz"))
        .send()
        .await;
    assert_eq!(r.unwrap().status(), 200);
    assert!(server.log_text().contains(files.key.to_str().unwrap()));
    assert!(open.get("/healthz").await.contains(" 200 "));
}

/// Runs the binary with `args` until it exits; returns its exit code and
/// everything it wrote.
fn run_refused(args: &[&str]) -> (Option<i32>, String) {
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_larder"))
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data.path())
        .args(args)
        .env_clear()
        .envs(common::child::clean_env())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn a_missing_or_bad_pair_stops_start_up_with_exit_2_naming_the_file() {
    let ca = Ca::new("test CA");
    let files = Files::new(&ca);
    let cert = files.cert.to_str().unwrap();
    let key = files.key.to_str().unwrap();
    let dir = files.cert.parent().unwrap();

    let missing = dir.join("nowhere.pem");
    let missing = missing.to_str().unwrap();
    let (code, text) = run_refused(&["--tls-cert", missing, "--tls-key", key]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains(missing), "{text}");

    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "hello\n").unwrap();
    let garbage = garbage.to_str().unwrap();
    let (code, text) = run_refused(&["--tls-cert", garbage, "--tls-key", key]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains(garbage), "{text}");
    let (code, text) = run_refused(&["--tls-cert", cert, "--tls-key", garbage]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains(garbage), "{text}");

    let other = dir.join("other.key");
    std::fs::write(&other, ca.leaf("other", &["127.0.0.1"], false).1).unwrap();
    let other = other.to_str().unwrap();
    let (code, text) = run_refused(&["--tls-cert", cert, "--tls-key", other]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains(other) && text.contains(cert), "{text}");

    let (code, text) = run_refused(&[
        "--tls-cert",
        cert,
        "--tls-key",
        key,
        "--tls-client-ca",
        missing,
    ]);
    assert_eq!(code, Some(2), "{text}");
    assert!(text.contains(missing), "{text}");
}

#[tokio::test]
async fn mutual_tls_takes_the_principal_from_the_client_certificate() {
    let ca = Ca::new("server CA");
    let clients = Ca::new("client CA");
    let files = Files::new(&ca);
    std::fs::write(&files.client_ca, clients.pem()).unwrap();
    let server = Server::start(&files, true, |c| {
        c.tokens = Some("bob:bob-token-1".into());
        c.admin_listen = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    })
    .await;
    let alice_id = clients.leaf("alice", &[], true);
    let alice = client(&ca, Some(&alice_id), false);
    ready(&alice, &server.url("")).await;

    // No client certificate: the handshake fails.
    let nobody = client(&ca, None, false);
    assert!(nobody.get(server.url("/healthz")).send().await.is_err());
    // A certificate from another CA: refused too.
    let stranger_id = Ca::new("stranger CA").leaf("mallory", &[], true);
    let stranger = client(&ca, Some(&stranger_id), false);
    assert!(stranger.get(server.url("/healthz")).send().await.is_err());

    // The certificate's CN is the principal.
    let r = alice
        .post(server.url("/v1/tables"))
        .json(&json!({"name": "mine", "access": "private"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["owner"], "alice");

    // A valid bearer token wins over the certificate: bob may not read
    // alice's private table.
    let r = alice
        .get(server.url("/v1/tables/mine"))
        .bearer_auth("bob-token-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    // An invalid one is 401.
    let r = alice
        .get(server.url("/v1/tables/mine"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // A CN that is not a principal name: 401.
    let odd_id = clients.leaf("not a name!", &[], true);
    let odd = client(&ca, Some(&odd_id), false);
    let r = odd.get(server.url("/v1/tables")).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // give_away accepts any valid principal name under mutual TLS.
    let r = alice
        .post(server.url("/v1/tables/mine/give_away"))
        .json(&json!({"to": "carol"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let carol = client(&ca, Some(&clients.leaf("carol", &[], true)), false);
    let r = carol
        .get(server.url("/v1/tables/mine"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = alice
        .get(server.url("/v1/tables/mine"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Probes need no certificate on the admin listener.
    let admin = server.admin.expect("admin listener");
    let r = reqwest::get(format!("http://{admin}/metrics"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
