//! Rows for larder exposed beyond loopback: a GET hit over HTTPS with
//! keep-alive against the same GET over plain HTTP (two servers on copies
//! of one data directory), and how fast refusals are: 429 answers to a
//! principal past its rate limit against 401 answers to requests without a
//! token, on one server.

use std::net::SocketAddr;
use std::path::Path;

use crate::pair::PairRow;
use crate::procs::{self, fail, Proc};
use crate::wrk::{self, Workload};
use crate::Options;

/// The token the refusal rows use.
const TOKEN: &str = "bench-token-0001";

/// Measures both rows.
pub fn run(opts: &Options, server: &Path, dir: &Path, scripts: &Path) -> Vec<PairRow> {
    let (c, d) = (opts.connections, opts.duration);
    let get = Workload::new("GET", "/v1/tables/hits/entries/%K", None, opts.keys);
    let get_script = get.save(scripts, "exposed-get");

    // One data directory filled once (a sync table: on disk when each
    // answer is sent), copied for the second server.
    let plain_dir = dir.join("exposed-plain");
    {
        let filler = procs::start_larder(server, &plain_dir, &[]);
        crate::create(
            filler.addr,
            serde_json::json!({"name": "hits", "persistence": "sync"}),
        );
        crate::fill(filler.addr, "hits", opts.keys);
    }
    let tls_dir = dir.join("exposed-tls");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(&plain_dir)
        .arg(&tls_dir)
        .status()
        .is_ok_and(|s| s.success());
    if !copied {
        fail("cannot copy the exposed rows' data directory");
    }
    let (cert, key) = certificate(dir);
    let plain = procs::start_larder(server, &plain_dir, &[]);
    let admin = SocketAddr::from(([127, 0, 0, 1], procs::free_port()));
    let admin_text = admin.to_string();
    let tls = procs::start_larder_probed(
        server,
        &tls_dir,
        &[
            "--tls-cert",
            path_str(&cert),
            "--tls-key",
            path_str(&key),
            "--admin-listen",
            &admin_text,
        ],
        Some(admin),
    );
    let mut over_tls = PairRow::new(
        "GET hit over HTTPS, keep-alive",
        "the same GET over plain HTTP",
        0.60,
    );
    over_tls.alternate(
        opts.rounds,
        || wrk::run(plain.addr, Some(&get_script), "/", c, d).rps,
        || {
            (
                wrk::run_scheme("https", tls.addr, Some(&get_script), "/", c, d),
                1.0,
            )
        },
    );
    drop((plain, tls));

    vec![over_tls, refusals(opts, server, dir, scripts, &get)]
}

/// 429 answers per second against 401 answers per second.
fn refusals(opts: &Options, server: &Path, dir: &Path, scripts: &Path, get: &Workload) -> PairRow {
    let (c, d) = (opts.connections, opts.duration);
    let tokens = format!("bench:{TOKEN}");
    let larder: Proc = procs::start_larder(
        server,
        &dir.join("exposed-refusals"),
        &["--tokens", &tokens, "--rate-limit", "1/1"],
    );
    let without_token = get.save(scripts, "exposed-401");
    let limited = get
        .with_header("Authorization", &format!("Bearer {TOKEN}"))
        .save(scripts, "exposed-429");
    // Check that the rows measure what they say: no token is 401, and
    // the token is past its limit after one request.
    let path = "/v1/tables/hits/entries/k000000000000001";
    let bearer = format!("Authorization: Bearer {TOKEN}\r\n");
    let (status, _) = procs::http(larder.addr, "GET", path, b"");
    if status != 401 {
        fail(&format!("a request without a token got {status}, not 401"));
    }
    procs::http_with(larder.addr, "GET", path, &bearer, b"");
    let (status, _) = procs::http_with(larder.addr, "GET", path, &bearer, b"");
    if status != 429 {
        fail(&format!(
            "a request past the rate limit got {status}, not 429"
        ));
    }
    let mut row = PairRow::new("429 answers (rate limited)", "401 answers (no token)", 1.0);
    // Every answer here is a refusal by design: only socket errors count.
    let refused = |script: &Path| {
        let mut run = wrk::run(larder.addr, Some(script), "/", c, d);
        run.non_2xx = 0;
        run
    };
    row.alternate(
        opts.rounds,
        || refused(&without_token).rps,
        || (refused(&limited), 1.0),
    );
    row
}

/// A self-signed certificate for 127.0.0.1, written into `dir`: (cert,
/// key) paths.
fn certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()])
        .unwrap_or_else(|e| fail(&format!("cannot make a certificate: {e}")));
    let cert = dir.join("bench-cert.pem");
    let key = dir.join("bench-key.pem");
    let written = std::fs::write(&cert, made.cert.pem())
        .and_then(|()| std::fs::write(&key, made.key_pair.serialize_pem()));
    if let Err(e) = written {
        fail(&format!("cannot write the certificate: {e}"));
    }
    (cert, key)
}

fn path_str(p: &Path) -> &str {
    p.to_str()
        .unwrap_or_else(|| fail("temporary paths are UTF-8"))
}
