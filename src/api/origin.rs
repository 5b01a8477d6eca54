//! The read-through miss path: a `GET` that misses on a table with an
//! `origin` fetches the value, stores it, and answers.
//!
//! # Stampede protection
//! Concurrent misses on one key share one fetch: the first caller creates a
//! [`OnceCell`] for the key and runs the fetch inside it; later callers
//! await the same cell. If the first caller goes away, another waiter takes
//! the fetch over. The value is stored in the table before the cell
//! completes, so requests arriving after it hit memory. Fetches for other
//! keys run independently, so a slow origin key blocks nobody else.
//!
//! # Negative caching
//! An origin 404 is remembered for `negative_ttl_ms` and answered from
//! memory until then.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::sync::OnceCell;

use crate::api::error::ApiError;
use crate::ops::{OpError, TableOps};
use crate::store::{Entry, Origin, Precondition, StoreError, Table, Value};

/// Characters percent-encoded when a key fills `{key}`: all but unreserved.
const KEY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// The outcome of one origin fetch, shared by every request that waited on it.
#[derive(Debug, Clone)]
enum Fetched {
    /// Stored (or, if the table refused it, only served).
    Found(Entry),
    /// The origin said 404.
    Missing,
    /// The origin failed: 502.
    Failed(String),
    /// The origin did not answer in time: 504.
    TimedOut,
}

type FlightKey = (Arc<str>, Box<str>);

/// Origin fetching with single flight and negative caching. Cloning is shallow.
#[derive(Debug, Clone)]
pub struct Origins {
    http: reqwest::Client,
    allow: Arc<Vec<String>>,
    /// Fetches in flight, by (table, key).
    inflight: Arc<DashMap<FlightKey, Arc<OnceCell<Fetched>>>>,
    /// Remembered 404s: (table, key) → Unix ms until which it is remembered.
    negative: Arc<DashMap<FlightKey, u64>>,
    /// Largest origin body accepted, bytes.
    max_body: usize,
}

impl Origins {
    /// An origin client allowing `allow` patterns (see `--origin-allow`),
    /// trusting the system's roots for `https://` origins.
    pub fn new(allow: Vec<String>, max_body: usize) -> Self {
        Self::with_client(allow, max_body, reqwest::Client::new())
    }

    /// As [`Origins::new`], also trusting the certificates of the PEM text
    /// `ca` (`--origin-ca`).
    ///
    /// # Errors
    /// A message when `ca` holds no certificate or the client cannot be
    /// built.
    pub fn with_ca(allow: Vec<String>, max_body: usize, ca: &[u8]) -> Result<Self, String> {
        let certs = reqwest::Certificate::from_pem_bundle(ca)
            .map_err(|e| format!("not PEM certificates: {e}"))?;
        if certs.is_empty() {
            return Err("holds no certificate".into());
        }
        let client = certs
            .into_iter()
            .fold(reqwest::Client::builder(), |b, c| b.add_root_certificate(c))
            .build()
            .map_err(|e| format!("cannot build the TLS client: {e}"))?;
        Ok(Self::with_client(allow, max_body, client))
    }

    fn with_client(allow: Vec<String>, max_body: usize, http: reqwest::Client) -> Self {
        Origins {
            http,
            allow: Arc::new(allow.into_iter().filter(|p| !p.trim().is_empty()).collect()),
            inflight: Arc::default(),
            negative: Arc::default(),
            max_body,
        }
    }

    /// Checks an origin at table creation: an `http://` or `https://` URL
    /// with `{key}`, whose host and port are allowed.
    ///
    /// # Errors
    /// [`ApiError::InvalidArgument`] saying what is wrong.
    pub fn check(&self, origin: &Origin) -> Result<(), ApiError> {
        let bad = |m: String| Err(ApiError::InvalidArgument(m));
        if !origin.url.contains("{key}") {
            return bad("origin.url must contain {key}".into());
        }
        let url = match reqwest::Url::parse(&origin.url.replace("{key}", "k")) {
            Ok(u) => u,
            Err(e) => return bad(format!("origin.url is not a URL: {e}")),
        };
        if !matches!(url.scheme(), "http" | "https") {
            return bad("origin.url must be http:// or https://".into());
        }
        let (Some(host), Some(port)) = (url.host_str(), url.port_or_known_default()) else {
            return bad("origin.url needs a host".into());
        };
        if !self.allow.iter().any(|p| allows(p, host, port)) {
            return bad(format!(
                "origin {host}:{port} is not allowed by this server's --origin-allow"
            ));
        }
        Ok(())
    }

    /// Forgets a dropped table's remembered 404s.
    pub fn forget_table(&self, table: &str) {
        self.negative.retain(|(t, _), _| &**t != table);
    }

    /// Whether an origin 404 for the key is still remembered.
    pub fn remembered_missing(&self, table: &Table, key: &str, now: u64) -> bool {
        let k: FlightKey = (table.name().into(), key.into());
        match self.negative.get(&k).map(|d| *d) {
            Some(until) if until > now => true,
            Some(_) => {
                self.negative.remove_if(&k, |_, until| *until <= now);
                false
            }
            None => false,
        }
    }

    /// Fetches the key from the table's origin (sharing a fetch already in
    /// flight) and answers as `GET` would.
    ///
    /// # Errors
    /// [`ApiError::KeyNotFound`] on origin 404, [`ApiError::OriginError`],
    /// [`ApiError::OriginTimeout`].
    pub async fn read_through(
        &self,
        table: &impl TableOps,
        key: &str,
        origin: &Origin,
    ) -> Result<Entry, ApiError> {
        let flight: FlightKey = (table.meta().name().into(), key.into());
        let cell = self
            .inflight
            .entry(flight.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let fetched = cell
            .get_or_init(|| self.fetch_and_store(table, key, origin))
            .await
            .clone();
        self.inflight
            .remove_if(&flight, |_, c| Arc::ptr_eq(c, &cell));
        match fetched {
            Fetched::Found(entry) => Ok(entry),
            Fetched::Missing => Err(ApiError::KeyNotFound),
            Fetched::Failed(why) => Err(ApiError::OriginError(why)),
            Fetched::TimedOut => Err(ApiError::OriginTimeout),
        }
    }

    async fn fetch_and_store(&self, table: &impl TableOps, key: &str, origin: &Origin) -> Fetched {
        let meta = table.meta();
        meta.stats.origin_fetches.fetch_add(1, Relaxed);
        let fetched = self.fetch(key, origin).await;
        match &fetched {
            Ok(Some(value)) => Fetched::Found(self.store_fetched(table, key, value, origin).await),
            Ok(None) => {
                let until = meta.now().saturating_add(origin.negative_ttl_ms);
                self.negative
                    .insert((meta.name().into(), key.into()), until);
                Fetched::Missing
            }
            Err(failed) => {
                meta.stats.origin_errors.fetch_add(1, Relaxed);
                failed.clone()
            }
        }
    }

    /// Stores a fetched value unless the key was written while the origin
    /// was asked (`insert_new`): a client's write is never overwritten by
    /// older origin data, and on a cluster table the nodes that fetched the
    /// same key at once all answer with the one value that was stored.
    async fn store_fetched(
        &self,
        table: &impl TableOps,
        key: &str,
        value: &Value,
        origin: &Origin,
    ) -> Entry {
        let uncached = || Entry {
            objects: crate::store::Objects::One(value.clone()),
            version: 0,
            ttl_ms: None,
        };
        let written = table
            .insert(
                key,
                value.clone(),
                Some(origin.ttl_ms),
                &Precondition::Absent,
            )
            .await;
        match written {
            Ok(w) => Entry {
                objects: crate::store::Objects::One(value.clone()),
                version: w.version,
                ttl_ms: Some(origin.ttl_ms),
            },
            Err(OpError::Store(StoreError::PreconditionFailed(_))) => {
                match table.peek(key, crate::ops::ReadFrom::Primary).await {
                    Ok(Some(stored)) => stored,
                    _ => uncached(),
                }
            }
            Err(e) => {
                let name = table.meta().name();
                tracing::debug!(table = name, error = %e, "origin value served but not cached");
                uncached()
            }
        }
    }

    async fn fetch(&self, key: &str, origin: &Origin) -> Result<Option<Value>, Fetched> {
        let url = origin
            .url
            .replace("{key}", &utf8_percent_encode(key, KEY_ENCODE).to_string());
        let timeout = Duration::from_millis(origin.timeout_ms);
        let request = async {
            let mut resp = self.http.get(&url).send().await.map_err(|e| describe(&e))?;
            match resp.status().as_u16() {
                200 => {}
                404 => return Ok(None),
                other => return Err(Fetched::Failed(format!("origin answered {other}"))),
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp.chunk().await.map_err(|e| describe(&e))? {
                if body.len() + chunk.len() > self.max_body {
                    return Err(Fetched::Failed(format!(
                        "origin body exceeds {} bytes",
                        self.max_body
                    )));
                }
                body.extend_from_slice(&chunk);
            }
            Value::parse(&body).map(Some).map_err(|_| {
                Fetched::Failed("origin answered 200 with a body that is not JSON".into())
            })
        };
        match tokio::time::timeout(timeout, request).await {
            Ok(result) => result,
            Err(_) => Err(Fetched::TimedOut),
        }
    }
}

fn describe(e: &reqwest::Error) -> Fetched {
    if e.is_timeout() {
        Fetched::TimedOut
    } else if e.is_connect() {
        Fetched::Failed("cannot connect to the origin".into())
    } else {
        Fetched::Failed("the origin request failed".into())
    }
}

/// Whether `host:port` matches an allow pattern.
fn allows(pattern: &str, host: &str, port: u16) -> bool {
    let Some((p_host, p_port)) = pattern.trim().rsplit_once(':') else {
        return false;
    };
    let port_ok = p_port == "*" || p_port.parse::<u16>() == Ok(port);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let p_host = p_host.trim_start_matches('[').trim_end_matches(']');
    let host_ok = match p_host.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(&format!(".{suffix}")),
        None => p_host == "*" || p_host.eq_ignore_ascii_case(host),
    };
    port_ok && host_ok
}

#[cfg(test)]
mod tests {
    use super::allows;

    #[test]
    fn allow_patterns() {
        assert!(allows("127.0.0.1:*", "127.0.0.1", 9000));
        assert!(allows("api.internal:8080", "API.internal", 8080));
        assert!(!allows("api.internal:8080", "api.internal", 8081));
        assert!(allows("*.internal:80", "users.internal", 80));
        assert!(!allows("*.internal:80", "internal", 80));
        assert!(!allows("*.internal:80", "evilinternal", 80));
        assert!(allows("[::1]:*", "[::1]", 1));
        assert!(!allows("garbage", "garbage", 1));
    }
}
