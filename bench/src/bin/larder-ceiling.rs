//! `larder-ceiling`: the benchmark's ceiling. A bare axum server with no
//! middleware at all that answers every path the benchmark drives with a
//! fixed body of the size larder's answer has, so the ratio of larder to
//! this server is what larder's own work costs on top of the HTTP stack.
//!
//! It reads request bodies (a PUT or counter request is not done until its
//! body has arrived) but parses nothing and stores nothing.
//!
//! Usage: `larder-ceiling [ADDR]` (default `127.0.0.1:0`); it prints
//! `listening on ADDR` once bound.

use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

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

fn json(body: Bytes) -> Response {
    ([(CONTENT_TYPE, "application/json")], body).into_response()
}

#[tokio::main]
async fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".to_owned());
    let b = bodies();
    let (entry, put, counter, scan) = (b.entry, b.put, b.counter, b.scan);
    let app = Router::new()
        .route("/noop", get(|| async { json(Bytes::from_static(b"{}")) }))
        .route(
            "/v1/tables/{table}/entries/{key}",
            get(move || {
                let body = entry.clone();
                async move { json(body) }
            })
            .put(move |_body: Bytes| {
                let body = put.clone();
                async move { json(body) }
            }),
        )
        .route(
            "/v1/tables/{table}/entries/{key}/counter",
            post(move |_body: Bytes| {
                let body = counter.clone();
                async move { json(body) }
            }),
        )
        .route(
            "/v1/tables/{table}/entries",
            get(move || {
                let body = scan.clone();
                async move { json(body) }
            }),
        );
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
    if let Err(e) = axum::serve(listener, app).await {
        eprintln!("larder-ceiling: {e}");
        std::process::exit(1);
    }
}
