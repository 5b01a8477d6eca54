//! `larder-ceiling`: the benchmark's floor of HTTP work. A minimal hyper
//! 1.x server, with no router, no middleware and no state, that reads each
//! request whole and answers with a fixed body of the size larder's answer
//! has, so the ratio of larder to this server is what larder's own work
//! costs on top of the least an HTTP server can do.
//!
//! The body is picked by the request's shape alone: `/noop` gets `{}`, a
//! query with `limit=` the body of a scan of 100, and otherwise GET an
//! entry, PUT a write's answer and POST a counter's.
//!
//! Usage: `larder-ceiling [ADDR]` (default `127.0.0.1:0`); it prints
//! `listening on ADDR` once bound.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;

/// Bodies shaped like larder's: a 16-byte key, a 100-byte JSON value.
struct Bodies {
    entry: Bytes,
    put: Bytes,
    counter: Bytes,
    scan: Bytes,
}

fn bodies() -> Bodies {
    let key = format!("k{:015}", 0);
    let value = format!("\"{}\"", "v".repeat(98));
    let scan_items: Vec<String> = (0..100)
        .map(|i| format!("{{\"key\":\"k{i:015}\",\"value\":{value}}}"))
        .collect();
    Bodies {
        entry: format!("{{\"key\":\"{key}\",\"value\":{value},\"ttl_ms\":null}}").into(),
        put: format!("{{\"key\":\"{key}\",\"created\":false}}").into(),
        counter: format!("{{\"key\":\"c0000\",\"value\":{}}}", 1_000_000).into(),
        scan: format!(
            "{{\"entries\":[{}],\"next_cursor\":null}}",
            scan_items.join(",")
        )
        .into(),
    }
}

async fn answer(
    bodies: Arc<Bodies>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = if req.uri().path() == "/noop" {
        Bytes::from_static(b"{}")
    } else if req.uri().query().is_some_and(|q| q.contains("limit=")) {
        bodies.scan.clone()
    } else {
        match *req.method() {
            Method::PUT => bodies.put.clone(),
            Method::POST => bodies.counter.clone(),
            _ => bodies.entry.clone(),
        }
    };
    // A write is not done until its body has arrived.
    let _ = req.into_body().collect().await;
    let mut resp = Response::new(Full::new(body));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let bodies = Arc::new(bodies());
    let listener = match tokio::net::TcpListener::bind(&addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("larder-ceiling: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    };
    match listener.local_addr() {
        Ok(a) => println!("listening on {a}"),
        Err(e) => {
            eprintln!("larder-ceiling: {e}");
            std::process::exit(1);
        }
    }
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                eprintln!("larder-ceiling: accept: {e}");
                continue;
            }
        };
        // As larder does: answers are small and sent whole.
        let _ = stream.set_nodelay(true);
        let bodies = bodies.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(bodies.clone(), req));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
