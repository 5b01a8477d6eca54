//! Rate limits: per principal (with overrides from the tokens file), per
//! client address for `anonymous`, 429 with `Retry-After` and the
//! `RateLimit-*` headers, probes never limited, a 401 costing nothing, and
//! the bound on tracked client addresses.

mod common;

use std::net::IpAddr;
use std::time::Instant;

use common::spawn_with;

/// Sends GET `url` with `token` until the first 429 (at most 60 requests);
/// returns the successes before it and the 429 itself.
async fn until_refused(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
) -> (Vec<reqwest::Response>, reqwest::Response) {
    let mut ok = Vec::new();
    for _ in 0..60 {
        let mut req = client.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        if r.status() == 429 {
            return (ok, r);
        }
        assert_eq!(r.status(), 200);
        ok.push(r);
    }
    panic!("60 requests and no 429");
}

fn header(r: &reqwest::Response, name: &str) -> Option<u64> {
    r.headers().get(name)?.to_str().ok()?.parse().ok()
}

#[tokio::test]
async fn principals_past_their_rate_get_429_with_retry_after_and_ratelimit_headers() {
    let app = spawn_with(|c| {
        c.tokens = Some(
            "admin:admin-token-1,alice:alice-token-1,carol:carol-token-1,bob:bob-token-01:rate=1000/1000"
                .into(),
        );
        c.rate_limit = Some("1/5".into());
    })
    .await;
    let c = &app.client;
    let tables = app.url("/v1/tables");
    let started = Instant::now();
    let (ok, refused) = until_refused(c, &tables, Some("alice-token-1")).await;
    // A burst of 5, plus at most one per second that passed meanwhile.
    let passed = started.elapsed().as_secs() as usize;
    assert!((5..=6 + passed).contains(&ok.len()), "{} allowed", ok.len());
    assert_eq!(header(&ok[0], "ratelimit-limit"), Some(5));
    assert_eq!(header(&ok[0], "ratelimit-remaining"), Some(4));
    assert!(header(&ok[0], "ratelimit-reset").is_some_and(|s| s >= 1));
    assert_eq!(header(ok.last().unwrap(), "ratelimit-remaining"), Some(0));
    assert!(header(&refused, "retry-after").is_some_and(|s| s >= 1));
    assert_eq!(header(&refused, "ratelimit-remaining"), Some(0));
    assert_eq!(header(&refused, "ratelimit-limit"), Some(5));
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limited");

    // Others have buckets of their own; bob's own rate wins over the
    // default.
    for _ in 0..20 {
        let r = c
            .get(&tables)
            .bearer_auth("bob-token-01")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "ratelimit-limit"), Some(1000));
    }
    // Probes and /metrics are never limited, and carry no RateLimit headers.
    for path in ["/healthz", "/readyz", "/metrics"] {
        for _ in 0..10 {
            let r = c
                .get(app.url(path))
                .bearer_auth("alice-token-1")
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            assert!(r.headers().get("ratelimit-limit").is_none(), "{path}");
        }
    }
    // A request with a bad token is 401 and costs carol nothing.
    for _ in 0..20 {
        let r = c
            .get(&tables)
            .bearer_auth("carol-token-X")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let (ok, _) = until_refused(c, &tables, Some("carol-token-1")).await;
    assert!(ok.len() >= 5, "carol got {} of her 5", ok.len());
    let refusals = app
        .metric_as("larder_rate_limited_total", Some("admin-token-1"))
        .await;
    assert!(refusals >= 2.0, "{refusals}");
}

#[tokio::test]
async fn anonymous_callers_are_limited_per_address_within_a_bounded_map() {
    let app = spawn_with(|c| {
        c.rate_limit = Some("1/3".into());
        c.rate_limit_max_clients = 2;
    })
    .await;
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let (one, two, three) = (
        from([127, 0, 0, 1]),
        from([127, 0, 0, 2]),
        from([127, 0, 0, 3]),
    );
    let tables = app.url("/v1/tables");
    let (ok, refused) = until_refused(&one, &tables, None).await;
    assert!(ok.len() >= 3);
    assert_eq!(header(&refused, "ratelimit-limit"), Some(3));
    // Another address has its own bucket.
    let r = two.get(&tables).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "ratelimit-remaining"), Some(2));
    // Both tracked addresses are recent: a third is refused rather than
    // tracked past --rate-limit-max-clients.
    let r = three.get(&tables).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(header(&r, "retry-after").is_some_and(|s| s >= 1));
    assert_eq!(app.metric("larder_rate_limit_clients").await, 2.0);
    assert_eq!(app.metric("larder_rate_limit_max_clients").await, 2.0);
}

#[tokio::test]
async fn a_bad_rate_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0", "5/0", "fast"] {
        let mut config = larder::config::Config::for_tests(dir.path().join("data"));
        config.rate_limit = Some(bad.into());
        let err = larder::app::App::build(config)
            .await
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("--rate-limit"), "{bad}: {err}");
    }
    let mut config = larder::config::Config::for_tests(dir.path().join("data"));
    config.tokens = Some("alice:alice-token-1:rate=5/10,alice:alice-token-2".into());
    let err = larder::app::App::build(config)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("same rate"), "{err}");
}
