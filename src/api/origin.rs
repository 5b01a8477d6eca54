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
//!
//! # Protecting the origin
//! Per origin (host and port): at most `--origin-max-inflight` fetches at
//! once (more wait for a turn within their request's deadline), and a
//! circuit breaker, as Envoy's outlier detection does it: after
//! `--origin-breaker-failures` failures in a row (5xx, timeouts, connection
//! errors; a 404 is an answer) the origin is not called for
//! `--origin-breaker-ms`, misses getting 503 `origin_unavailable` at once;
//! then one trial fetch goes through, and its outcome closes the breaker or
//! opens it again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use dashmap::DashMap;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use tokio::sync::{OnceCell, Semaphore};

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
    /// The origin's breaker is open: 503, without calling it.
    Unavailable(String),
}

type FlightKey = (Arc<str>, Box<str>);

/// How hard larder may lean on one origin.
#[derive(Debug, Clone, Copy)]
pub struct OriginLimits {
    /// Fetches in flight to one origin at once (`--origin-max-inflight`).
    pub max_inflight: usize,
    /// Failures in a row that open the breaker (`--origin-breaker-failures`).
    pub breaker_failures: u32,
    /// How long an open breaker keeps the origin uncalled, ms
    /// (`--origin-breaker-ms`).
    pub breaker_ms: u64,
}

impl Default for OriginLimits {
    fn default() -> Self {
        OriginLimits {
            max_inflight: 64,
            breaker_failures: 5,
            breaker_ms: 5_000,
        }
    }
}

/// Most headers one origin may send.
pub const MAX_ORIGIN_HEADERS: usize = 16;

/// The prefix every environment variable named in an origin header must
/// have: the server's other variables (tokens among them) stay out of
/// reach of whoever creates tables.
pub const ORIGIN_ENV_PREFIX: &str = "LARDER_ORIGIN_";

/// One origin's turn-taking and breaker.
#[derive(Debug)]
struct OriginState {
    turns: Semaphore,
    /// Failures in a row.
    failures: AtomicU32,
    /// Clock ms until which the breaker is open; 0 when closed.
    open_until: AtomicU64,
    /// A trial fetch is running (the breaker's open time has passed).
    trial: AtomicBool,
}

/// What the breaker lets a fetch do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Closed: fetch.
    Through,
    /// Half open: this fetch is the trial.
    Trial,
    /// Open: do not call the origin.
    Refused,
}

impl OriginState {
    fn new(turns: usize) -> Self {
        OriginState {
            turns: Semaphore::new(turns.max(1)),
            failures: AtomicU32::new(0),
            open_until: AtomicU64::new(0),
            trial: AtomicBool::new(false),
        }
    }

    fn pass(&self, now: u64) -> Pass {
        let until = self.open_until.load(Relaxed);
        if until == 0 {
            Pass::Through
        } else if now < until {
            Pass::Refused
        } else if self
            .trial
            .compare_exchange(false, true, Relaxed, Relaxed)
            .is_ok()
        {
            Pass::Trial
        } else {
            Pass::Refused
        }
    }

    /// Records a fetch's outcome (`ok`: an answer, 404 included).
    fn record(&self, pass: Pass, ok: bool, now: u64, limits: &OriginLimits) {
        if ok {
            self.failures.store(0, Relaxed);
            self.open_until.store(0, Relaxed);
            if pass == Pass::Trial {
                self.trial.store(false, Relaxed);
            }
            return;
        }
        let failures = self.failures.fetch_add(1, Relaxed).saturating_add(1);
        if pass == Pass::Trial || failures >= limits.breaker_failures.max(1) {
            self.open_until
                .store(now.saturating_add(limits.breaker_ms).max(1), Relaxed);
            if pass == Pass::Trial {
                self.trial.store(false, Relaxed);
            }
        }
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Relaxed) != 0
    }
}

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
    limits: OriginLimits,
    /// Turns and breakers by origin `host:port`. One per origin host any
    /// table names, so bounded by `--max-tables`.
    origins: Arc<DashMap<String, Arc<OriginState>>>,
    /// Background refreshes running, by (table, key): one per key. Bounded
    /// by the origins' turns, which every refresh holds.
    refreshing: Arc<DashMap<FlightKey, ()>>,
    /// The `LARDER_ORIGIN_*` environment, read at start and on `SIGHUP`.
    env: Arc<RwLock<HashMap<String, String>>>,
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
            limits: OriginLimits::default(),
            origins: Arc::default(),
            refreshing: Arc::default(),
            env: Arc::new(RwLock::new(origin_env())),
        }
    }

    /// The same fetcher under `limits`.
    pub fn with_limits(self, limits: OriginLimits) -> Self {
        Origins { limits, ..self }
    }

    /// Reads the `LARDER_ORIGIN_*` environment again (`SIGHUP`).
    pub fn reload_env(&self) {
        *self.env.write().unwrap_or_else(PoisonError::into_inner) = origin_env();
    }

    /// Whether each origin's breaker is open, by `host:port` (for
    /// `/metrics`).
    pub fn breakers(&self) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = self
            .origins
            .iter()
            .map(|e| (e.key().clone(), e.value().is_open()))
            .collect();
        out.sort();
        out
    }

    fn state_of(&self, origin: &str) -> Arc<OriginState> {
        if let Some(s) = self.origins.get(origin) {
            return s.clone();
        }
        self.origins
            .entry(origin.to_owned())
            .or_insert_with(|| Arc::new(OriginState::new(self.limits.max_inflight)))
            .clone()
    }

    /// Checks an origin at table creation: an `http://` or `https://` URL
    /// with `{key}`, whose host and port are allowed, and header templates
    /// naming only `LARDER_ORIGIN_*` variables that are set.
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
        if origin
            .refresh_ahead_ms
            .is_some_and(|ahead| ahead >= origin.ttl_ms)
        {
            return bad("origin.refresh_ahead_ms must be less than origin.ttl_ms".into());
        }
        check_headers(&origin.headers).map_err(ApiError::InvalidArgument)?;
        // A variable must be set when the table is created, so a typo is a
        // 400 now rather than a 502 at the first miss. One unset later (a
        // restart or SIGHUP without it) fails that origin's fetches instead:
        // the table itself stays loadable.
        let env = self.env.read().unwrap_or_else(PoisonError::into_inner);
        for (name, template) in &origin.headers {
            if let Err(var) = fill_template(template, |var| env.get(var).cloned()) {
                return bad(format!(
                    "origin.headers.{name}: the environment variable {var} is not set on this server"
                ));
            }
        }
        Ok(())
    }

    /// Refresh-ahead: when a hit on `key` (at `version`, with `ttl_left`
    /// ms to live) is within the origin's `refresh_ahead_ms` of expiry,
    /// fetches it again in the background. At most one refresh per key
    /// runs; none starts while the origin's breaker is open or all its
    /// turns are taken (misses come first). The fetched value replaces the
    /// entry only if the entry is still at `version`: a client's write made
    /// meanwhile is kept.
    pub fn refresh_ahead(
        &self,
        state: &crate::api::AppState,
        table: &Table,
        key: &str,
        version: u64,
        ttl_left: Option<u64>,
    ) {
        let Some(origin) = table.origin() else {
            return;
        };
        let (Some(ahead), Some(left)) = (origin.refresh_ahead_ms, ttl_left) else {
            return;
        };
        if left > ahead {
            return;
        }
        let flight: FlightKey = (table.name().into(), key.into());
        if self.inflight.contains_key(&flight) || self.refreshing.contains_key(&flight) {
            return;
        }
        let origin_state = self.state_of(&origin_host(&origin.url));
        let pass = origin_state.pass(table.now());
        if pass == Pass::Refused {
            return;
        }
        let Ok(turn) = origin_state.turns.try_acquire() else {
            if pass == Pass::Trial {
                origin_state.trial.store(false, Relaxed);
            }
            return;
        };
        turn.forget();
        if self.refreshing.insert(flight.clone(), ()).is_some() {
            origin_state.turns.add_permits(1);
            if pass == Pass::Trial {
                origin_state.trial.store(false, Relaxed);
            }
            return;
        }
        let state = state.clone();
        let origin = origin.clone();
        let key = key.to_owned();
        tokio::spawn(async move {
            let origins = &state.origins;
            if let Ok(table) = state.tables.find(&flight.0).await {
                origins
                    .refresh_one(&table, &key, &origin, version, pass, &origin_state)
                    .await;
            }
            origin_state.turns.add_permits(1);
            origins.refreshing.remove(&flight);
        });
    }

    async fn refresh_one(
        &self,
        table: &impl TableOps,
        key: &str,
        origin: &Origin,
        version: u64,
        pass: Pass,
        origin_state: &OriginState,
    ) {
        let meta = table.meta();
        let Ok(headers) = self.resolve_headers(&origin.headers) else {
            meta.stats.origin_errors.fetch_add(1, Relaxed);
            return;
        };
        meta.stats.origin_fetches.fetch_add(1, Relaxed);
        let fetched = self.fetch(key, origin, headers, meta.raw_values()).await;
        origin_state.record(pass, fetched.is_ok(), meta.now(), &self.limits);
        match fetched {
            Ok(Some(value)) => {
                let kept = table
                    .insert(
                        key,
                        value,
                        Some(origin.ttl_ms),
                        &Precondition::Version(vec![version]),
                    )
                    .await;
                if let Err(e) = kept {
                    tracing::debug!(table = meta.name(), error = %e, "refresh not stored");
                }
            }
            // A 404 or a failure: the entry lives out its TTL.
            Ok(None) => {}
            Err(_) => {
                meta.stats.origin_errors.fetch_add(1, Relaxed);
            }
        }
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
    ///
    /// `replacing` is the version of the cached entry a `no-cache` request
    /// skipped: the fetched value replaces it only if it is still there
    /// (`None`: the key was absent, and the value is stored only if it
    /// still is).
    pub async fn read_through(
        &self,
        table: &impl TableOps,
        key: &str,
        origin: &Origin,
        replacing: Option<u64>,
    ) -> Result<Entry, ApiError> {
        let flight: FlightKey = (table.meta().name().into(), key.into());
        let cell = self
            .inflight
            .entry(flight.clone())
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let fetched = cell
            .get_or_init(|| self.fetch_and_store(table, key, origin, replacing))
            .await
            .clone();
        self.inflight
            .remove_if(&flight, |_, c| Arc::ptr_eq(c, &cell));
        match fetched {
            Fetched::Found(entry) => Ok(entry),
            Fetched::Missing => Err(ApiError::KeyNotFound),
            Fetched::Failed(why) => Err(ApiError::OriginError(why)),
            Fetched::TimedOut => Err(ApiError::OriginTimeout),
            Fetched::Unavailable(origin) => Err(ApiError::OriginUnavailable(origin)),
        }
    }

    async fn fetch_and_store(
        &self,
        table: &impl TableOps,
        key: &str,
        origin: &Origin,
        replacing: Option<u64>,
    ) -> Fetched {
        let meta = table.meta();
        // A header naming an unset variable is this server's problem, not
        // the origin's: 502 every time, and the breaker is not involved.
        let headers = match self.resolve_headers(&origin.headers) {
            Ok(h) => h,
            Err(failed) => {
                meta.stats.origin_errors.fetch_add(1, Relaxed);
                return failed;
            }
        };
        let host = origin_host(&origin.url);
        let state = self.state_of(&host);
        let pass = state.pass(meta.now());
        if pass == Pass::Refused {
            return Fetched::Unavailable(host);
        }
        // A turn among this origin's fetches; waiting is bounded by the
        // request's deadline, which drops this future.
        let Ok(_turn) = state.turns.acquire().await else {
            return Fetched::Failed("the origin's fetch queue is closed".into());
        };
        meta.stats.origin_fetches.fetch_add(1, Relaxed);
        let fetched = self.fetch(key, origin, headers, meta.raw_values()).await;
        state.record(pass, fetched.is_ok(), meta.now(), &self.limits);
        match &fetched {
            Ok(Some(value)) => Fetched::Found(
                self.store_fetched(table, key, value, origin, replacing)
                    .await,
            ),
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
        replacing: Option<u64>,
    ) -> Entry {
        let uncached = || Entry {
            objects: crate::store::Objects::One(value.clone()),
            version: 0,
            ttl_ms: None,
            modified: crate::store::unix_seconds(table.meta().now()),
        };
        let written = table
            .insert(
                key,
                value.clone(),
                Some(origin.ttl_ms),
                &match replacing {
                    None => Precondition::Absent,
                    Some(version) => Precondition::Version(vec![version]),
                },
            )
            .await;
        match written {
            Ok(w) => Entry {
                objects: crate::store::Objects::One(value.clone()),
                version: w.version,
                ttl_ms: Some(origin.ttl_ms),
                modified: crate::store::unix_seconds(table.meta().now()),
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

    /// Asks the origin for `key`: its 200 body is the value (JSON; on a
    /// `"values": "any"` table, a body that is not JSON is kept as bytes
    /// with the origin's `Content-Type`, as a `PUT` would keep it).
    async fn fetch(
        &self,
        key: &str,
        origin: &Origin,
        headers: reqwest::header::HeaderMap,
        raw_values: bool,
    ) -> Result<Option<Value>, Fetched> {
        let url = origin
            .url
            .replace("{key}", &utf8_percent_encode(key, KEY_ENCODE).to_string());
        let timeout = Duration::from_millis(origin.timeout_ms);
        let request = async {
            let mut resp = self
                .http
                .get(&url)
                .headers(headers)
                .send()
                .await
                .map_err(|e| describe(&e))?;
            match resp.status().as_u16() {
                200 => {}
                404 => return Ok(None),
                other => return Err(Fetched::Failed(format!("origin answered {other}"))),
            }
            let content_type = resp.headers().get(reqwest::header::CONTENT_TYPE).cloned();
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
            super::raw::body_value(raw_values, content_type.as_ref(), &body)
                .map(Some)
                .map_err(|_| {
                    Fetched::Failed("origin answered 200 with a body that is not JSON".into())
                })
        };
        match tokio::time::timeout(timeout, request).await {
            Ok(result) => result,
            Err(_) => Err(Fetched::TimedOut),
        }
    }
}

impl Origins {
    /// The headers of a fetch, with the environment's values in place of
    /// their `${LARDER_ORIGIN_…}` names.
    fn resolve_headers(
        &self,
        templates: &BTreeMap<String, String>,
    ) -> Result<reqwest::header::HeaderMap, Fetched> {
        let mut headers = reqwest::header::HeaderMap::new();
        if templates.is_empty() {
            return Ok(headers);
        }
        let env = self.env.read().unwrap_or_else(PoisonError::into_inner);
        for (name, template) in templates {
            let value = fill_template(template, |var| env.get(var).cloned()).map_err(|var| {
                tracing::warn!(
                    header = %name,
                    variable = %var,
                    "an origin header names an environment variable that is not set"
                );
                Fetched::Failed(format!("origin header {name}: ${{{var}}} is not set"))
            })?;
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes());
            let value = reqwest::header::HeaderValue::from_str(&value);
            match (name, value) {
                (Ok(n), Ok(v)) => {
                    headers.insert(n, v);
                }
                _ => {
                    return Err(Fetched::Failed(
                        "an origin header's value is not a valid header value".into(),
                    ))
                }
            }
        }
        Ok(headers)
    }
}

/// The `LARDER_ORIGIN_*` variables of the process's environment.
fn origin_env() -> HashMap<String, String> {
    std::env::vars()
        .filter(|(k, _)| k.starts_with(ORIGIN_ENV_PREFIX))
        .collect()
}

/// `template` with each `${NAME}` replaced by `lookup(NAME)`; the name of
/// the first variable `lookup` does not know otherwise. Text outside
/// `${…}` is kept as it is.
fn fill_template(
    template: &str,
    mut lookup: impl FnMut(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let var = &after[..end];
        out.push_str(&lookup(var).ok_or_else(|| var.to_owned())?);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks an origin's headers at table creation.
fn check_headers(headers: &BTreeMap<String, String>) -> Result<(), String> {
    if headers.len() > MAX_ORIGIN_HEADERS {
        return Err(format!(
            "origin.headers may name at most {MAX_ORIGIN_HEADERS} headers"
        ));
    }
    for (name, template) in headers {
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(format!("origin.headers: {name:?} is not a header name"));
        }
        if template.len() > 1024 {
            return Err(format!(
                "origin.headers.{name}: a template is at most 1024 bytes"
            ));
        }
        let mut names = Vec::new();
        fill_template(template, |var| {
            names.push(var.to_owned());
            Some(String::new())
        })
        .map_err(|var| format!("origin.headers.{name}: bad variable {var:?}"))?;
        if template.matches("${").count() != names.len() {
            return Err(format!(
                "origin.headers.{name}: a `${{` is not closed by `}}`"
            ));
        }
        for var in names {
            let ok = var.len() > ORIGIN_ENV_PREFIX.len()
                && var.starts_with(ORIGIN_ENV_PREFIX)
                && var
                    .bytes()
                    .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_');
            if !ok {
                return Err(format!(
                    "origin.headers.{name}: ${{{var}}} is not allowed: header values may only name environment variables {ORIGIN_ENV_PREFIX}* (upper case, digits, _)"
                ));
            }
        }
        // The literal text must be a valid header value by itself.
        let literal = fill_template(template, |_| Some(String::new())).unwrap_or_default();
        if reqwest::header::HeaderValue::from_str(&literal).is_err() {
            return Err(format!("origin.headers.{name}: not a valid header value"));
        }
    }
    Ok(())
}

/// The `host:port` of an origin URL template: what breakers and turns are
/// kept by.
fn origin_host(url: &str) -> String {
    reqwest::Url::parse(&url.replace("{key}", "k"))
        .ok()
        .and_then(|u| {
            let host = u.host_str()?.to_owned();
            Some(format!("{host}:{}", u.port_or_known_default()?))
        })
        .unwrap_or_else(|| url.to_owned())
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
    use super::*;

    #[test]
    fn header_templates_name_origin_variables_only() {
        let h = |name: &str, v: &str| -> BTreeMap<String, String> {
            [(name.to_owned(), v.to_owned())].into_iter().collect()
        };
        assert!(check_headers(&h("X-Api-Key", "${LARDER_ORIGIN_KEY}")).is_ok());
        assert!(check_headers(&h("Authorization", "Bearer ${LARDER_ORIGIN_T1}")).is_ok());
        assert!(check_headers(&h("X-Static", "plain")).is_ok());
        assert!(check_headers(&h("X-Api-Key", "${HOME}")).is_err());
        assert!(check_headers(&h("X-Api-Key", "${LARDER_TOKENS}")).is_err());
        assert!(check_headers(&h("X-Api-Key", "${LARDER_ORIGIN_}")).is_err());
        assert!(check_headers(&h("X-Api-Key", "${LARDER_ORIGIN_KEY")).is_err());
        assert!(check_headers(&h("bad name", "x")).is_err());
        assert!(check_headers(&h("X-A", "line\nbreak")).is_err());
        let many: BTreeMap<String, String> = (0..=MAX_ORIGIN_HEADERS)
            .map(|i| (format!("X-{i}"), "v".to_owned()))
            .collect();
        assert!(check_headers(&many).is_err());

        let env: HashMap<String, String> = [("LARDER_ORIGIN_T1".to_owned(), "s3cret".to_owned())]
            .into_iter()
            .collect();
        let get = |v: &str| env.get(v).cloned();
        assert_eq!(
            fill_template("Bearer ${LARDER_ORIGIN_T1}", get).unwrap(),
            "Bearer s3cret"
        );
        assert_eq!(
            fill_template("${LARDER_ORIGIN_NONE}", get).unwrap_err(),
            "LARDER_ORIGIN_NONE"
        );
    }

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_and_closes_after_a_good_trial() {
        let limits = OriginLimits {
            max_inflight: 4,
            breaker_failures: 3,
            breaker_ms: 1000,
        };
        let s = OriginState::new(4);
        for _ in 0..2 {
            assert_eq!(s.pass(0), Pass::Through);
            s.record(Pass::Through, false, 0, &limits);
        }
        // A success resets the count.
        s.record(Pass::Through, true, 0, &limits);
        for _ in 0..3 {
            assert_eq!(s.pass(10), Pass::Through);
            s.record(Pass::Through, false, 10, &limits);
        }
        assert!(s.is_open());
        assert_eq!(s.pass(500), Pass::Refused);
        // After the open time, one trial; others are still refused.
        assert_eq!(s.pass(1010), Pass::Trial);
        assert_eq!(s.pass(1010), Pass::Refused);
        // A failed trial opens it again.
        s.record(Pass::Trial, false, 1010, &limits);
        assert_eq!(s.pass(1500), Pass::Refused);
        assert_eq!(s.pass(2010), Pass::Trial);
        s.record(Pass::Trial, true, 2010, &limits);
        assert!(!s.is_open());
        assert_eq!(s.pass(2011), Pass::Through);
    }

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
