//! The server's configuration: one clap struct, every flag also an
//! environment variable, every field documented with its unit and default.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable, coloured when on a terminal.
    #[default]
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

/// larder's settings. `Debug` prints everything but the tokens.
#[derive(Clone, Parser)]
#[command(
    name = "larder",
    version,
    about = "ETS/DETS-style tables over HTTP/JSON"
)]
pub struct Config {
    /// Address to listen on. Port 0 picks a free port.
    #[arg(long, env = "LARDER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// A second, plain-HTTP address serving only `/healthz`, `/readyz` and
    /// `/metrics`, without tokens: for probes and scrapers. `--healthcheck`
    /// asks it when set. None by default.
    #[arg(long, env = "LARDER_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,

    /// Connections the admin listener serves at once (probes and scrapers
    /// only); at the cap the longest idle one is closed to make room.
    #[arg(long, env = "LARDER_ADMIN_MAX_CONNECTIONS", default_value_t = 64)]
    pub admin_max_connections: u32,

    /// PEM certificate chain (leaf first): with `--tls-key`, the listener
    /// speaks HTTPS only (HTTP/2 and HTTP/1.1 by ALPN). `SIGHUP` reloads the
    /// pair; a pair that fails to load is logged and the old one stays.
    #[arg(long, env = "LARDER_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `--tls-cert`.
    #[arg(long, env = "LARDER_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: clients must present a certificate signed by
    /// one (mutual TLS), and a request without a bearer token is made by the
    /// principal named in the certificate's subject common name.
    #[arg(long, env = "LARDER_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Directory for durable tables; created if missing.
    #[arg(long, env = "LARDER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Bytes of sled's page cache (the durable tier). larder keeps every
    /// live object in its own memory, so sled's pages are read back only at
    /// start-up and when a write-back round updates a page it evicted: a
    /// larger cache makes write-back of big, randomly written durable tables
    /// faster at the price of memory; a smaller one bounds memory.
    #[arg(long, env = "LARDER_SLED_CACHE_BYTES", default_value_t = crate::persist::DEFAULT_SLED_CACHE_BYTES)]
    pub sled_cache_bytes: u64,

    /// PostgreSQL URL (`postgres://user:pass@host:port/db`) of the cluster
    /// this node joins. With it, tables with `"persistence": "cluster"` live
    /// in that database and are shared by every node given the same URL;
    /// without it, such tables are refused.
    #[arg(long, env = "LARDER_CLUSTER_URL", hide_env_values = true)]
    pub cluster_url: Option<String>,

    /// Bytes of cluster-table entries this node keeps as its hot copy
    /// (least recently used go first). PostgreSQL holds everything; a read
    /// that misses the hot copy asks it.
    #[arg(long, env = "LARDER_CLUSTER_CACHE_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub cluster_cache_bytes: u64,

    /// How often this node reads the cluster's change log, in milliseconds.
    /// The staleness bound below must be larger.
    #[arg(long, env = "LARDER_CLUSTER_POLL_MS", default_value_t = 5)]
    pub cluster_poll_ms: u64,

    /// Longest a cluster-table read may lag a write acknowledged by another
    /// node, in milliseconds. When this node has not caught up with the
    /// change log within it, reads go to PostgreSQL instead of the hot copy.
    #[arg(long, env = "LARDER_CLUSTER_STALENESS_MS", default_value_t = 250)]
    pub cluster_staleness_ms: u64,

    /// Connections this node opens to PostgreSQL at most.
    #[arg(long, env = "LARDER_CLUSTER_POOL_SIZE", default_value_t = 32)]
    pub cluster_pool_size: usize,

    /// Largest request body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "LARDER_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Log line format.
    #[arg(long, env = "LARDER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or `larder=debug`.
    #[arg(long, env = "LARDER_LOG", default_value = "info")]
    pub log: String,

    /// Server-wide limit on the estimated bytes held by all tables; 0 for
    /// none. Past it, writes that would grow memory get 507 `memory_limit`,
    /// except in `lru` tables, which evict instead.
    #[arg(long, env = "LARDER_MAX_MEMORY_BYTES", default_value_t = 0)]
    pub max_memory_bytes: u64,

    /// Origins tables may read through to, as `host:port` patterns
    /// separated by commas: `*` matches any port, a leading `*.` any
    /// subdomain (`127.0.0.1:*`, `*.internal:8080`). Empty: no origins.
    #[arg(long, env = "LARDER_ORIGIN_ALLOW", value_delimiter = ',')]
    pub origin_allow: Vec<String>,

    /// A PEM file of certificates trusted for `https://` origins, besides
    /// the system's roots (an internal CA). Unreadable or with no
    /// certificate: start-up is refused.
    #[arg(long, env = "LARDER_ORIGIN_CA")]
    pub origin_ca: Option<PathBuf>,

    /// Fetches in flight to one origin (host and port) at once; more misses
    /// wait for a turn within their request's deadline.
    #[arg(long, env = "LARDER_ORIGIN_MAX_INFLIGHT", default_value_t = 64)]
    pub origin_max_inflight: u32,

    /// Failures in a row (5xx, timeouts, connection errors) after which an
    /// origin is not called for `--origin-breaker-ms`: misses get 503
    /// `origin_unavailable` at once.
    #[arg(long, env = "LARDER_ORIGIN_BREAKER_FAILURES", default_value_t = 5)]
    pub origin_breaker_failures: u32,

    /// How long an open breaker keeps its origin uncalled, in ms; then one
    /// trial fetch closes it or opens it again.
    #[arg(long, env = "LARDER_ORIGIN_BREAKER_MS", default_value_t = 5000)]
    pub origin_breaker_ms: u64,

    /// Keys of transactions a durable table holds in groups (to write each
    /// transaction in one batch) before its write-back runs at once,
    /// whatever `auto_save_ms` says.
    #[arg(long, env = "LARDER_MAX_GROUPED_KEYS", default_value_t = 65_536)]
    pub max_grouped_keys: u64,

    /// Most expired entries one table keeps for its origin's
    /// `stale_if_error_ms`; past it (or past --max-memory-bytes) an
    /// expiring entry is not kept.
    #[arg(long, env = "LARDER_MAX_STALE_ENTRIES", default_value_t = 100_000)]
    pub max_stale_entries: u64,

    /// File of `principal:secret[:read]` lines, the secret being the token
    /// or `sha256:<hex>` (`#` starts a comment); reloaded on `SIGHUP`. With
    /// no tokens configured, authentication is off and every caller is
    /// `anonymous`, with full rights; a file with no token is refused.
    #[arg(long, env = "LARDER_TOKENS_FILE")]
    pub tokens_file: Option<PathBuf>,

    /// `principal:token` pairs separated by commas, added to the tokens file.
    #[arg(long, env = "LARDER_TOKENS", hide_env_values = true)]
    pub tokens: Option<String>,

    /// Requests per second each principal may make, `N` or `N/burst`
    /// (burst defaults to N); `anonymous` callers are limited per client
    /// address. Past it: 429 `rate_limited`. A principal's `rate=` option
    /// in the tokens file overrides it. None by default.
    #[arg(long, env = "LARDER_RATE_LIMIT")]
    pub rate_limit: Option<String>,

    /// Most client addresses whose rate-limit buckets are kept; a new
    /// address is refused (429) while all are recent.
    #[arg(long, env = "LARDER_RATE_LIMIT_MAX_CLIENTS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub rate_limit_max_clients: u64,

    /// The principal that may do everything.
    #[arg(long, env = "LARDER_ADMIN_PRINCIPAL", default_value = "admin")]
    pub admin_principal: String,

    /// Listen on a non-loopback address even with authentication off.
    #[arg(long, env = "LARDER_ALLOW_INSECURE_PUBLIC", default_value_t = false)]
    pub allow_insecure_public: bool,

    /// Most tables that may exist; creating one more is 507 `table_limit`.
    #[arg(long, env = "LARDER_MAX_TABLES", default_value_t = 1000)]
    pub max_tables: usize,

    /// Objects one select, select_count or select_delete request examines
    /// at most; past it the answer carries what was found and a cursor.
    #[arg(long, env = "LARDER_MAX_SELECT_SCAN", default_value_t = 1_000_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_select_scan: u64,

    /// Scans, selects, exports and imports that run at once; more wait in
    /// line until their deadline, then get 503. Default: the number of
    /// cores.
    #[arg(long, env = "LARDER_MAX_LONG_REQUESTS",
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_long_requests: Option<u64>,

    /// Largest select or scan page, in bytes of JSON text: the result that
    /// would cross it starts the next page, and a single result over it is
    /// 422 `result_too_large`. Also bounds a multi-get's answer.
    #[arg(long, env = "LARDER_MAX_RESPONSE_BYTES", default_value_t = 8 << 20,
          value_parser = clap::value_parser!(u64).range(4096..))]
    pub max_response_bytes: u64,

    /// Largest import stream accepted, in bytes (imports are not bound by
    /// `--max-body-bytes`).
    #[arg(long, env = "LARDER_MAX_IMPORT_BYTES", default_value_t = 1 << 30)]
    pub max_import_bytes: u64,

    /// Seconds the answer of a write sent with `Idempotency-Key` is
    /// remembered, so that a retry with the same key is not applied again.
    #[arg(long, env = "LARDER_IDEMPOTENCY_TTL_SECS", default_value_t = 86_400)]
    pub idempotency_ttl_secs: u64,

    /// Milliseconds between purges of expired idempotency answers (in
    /// memory and on disk); each purge also rebuilds the record filter.
    #[arg(long, env = "LARDER_IDEMPOTENCY_PURGE_MS", default_value_t = 60_000)]
    pub idempotency_purge_ms: u64,

    /// Most bytes of memory the answers remembered for `Idempotency-Key`
    /// may hold (answers included). Only writes to memory-only tables keep
    /// their answers in memory; past this the oldest expire early. Records
    /// of durable tables stay on disk (or in PostgreSQL) and are read from
    /// there on a retry.
    #[arg(long, env = "LARDER_IDEMPOTENCY_MAX_BYTES", default_value_t = 64 << 20)]
    pub idempotency_max_bytes: u64,

    /// Bytes of the Bloom filter that tells a fresh `Idempotency-Key` on a
    /// durable table without a disk lookup. Allocated at the first keyed
    /// write to a durable table (twice this while the purge rebuilds it).
    /// The default holds about four million records with one lookup in 500
    /// going to disk needlessly; past that more go to disk, none is missed.
    #[arg(long, env = "LARDER_IDEMPOTENCY_FILTER_BYTES", default_value_t = 8 << 20)]
    pub idempotency_filter_bytes: u64,

    /// Idempotency records of durable tables the server indexes in memory
    /// (about 24 bytes each). Indexed records are stored many to one disk
    /// item, which keeps a keyed write to a durable table nearly as cheap
    /// as one without a key; past the bound each record is stored on its
    /// own and found by a lookup on disk: slower, never lost.
    #[arg(long, env = "LARDER_IDEMPOTENCY_INDEX_ENTRIES", default_value_t = crate::persist::bundle::DEFAULT_INDEX_ENTRIES)]
    pub idempotency_index_entries: u64,

    /// Changes each watched table keeps for watchers that resume or fall
    /// behind (`Last-Event-ID`, `since`).
    #[arg(long, env = "LARDER_WATCH_HISTORY", default_value_t = 10_000)]
    pub watch_history: u64,

    /// Most bytes of keys and values each watched table's history keeps.
    #[arg(long, env = "LARDER_WATCH_HISTORY_BYTES", default_value_t = 64 << 20)]
    pub watch_history_bytes: u64,

    /// How long a table keeps its change history after its last watcher
    /// left (a watcher leaves when its connection closes), in
    /// milliseconds, so that a client that lost its connection can resume;
    /// the history is freed after it.
    #[arg(
        long,
        env = "LARDER_WATCH_HISTORY_RETENTION_MS",
        default_value_t = 60_000
    )]
    pub watch_history_retention_ms: u64,

    /// Longest a change stream stays silent, in milliseconds, before it
    /// sends a comment line.
    #[arg(long, env = "LARDER_WATCH_HEARTBEAT_MS", default_value_t = 15_000)]
    pub watch_heartbeat_ms: u64,

    /// A connection that takes no bytes of a response for this long, in
    /// milliseconds, is closed: a client that stops reading (a watcher
    /// that never reads, a stalled export) cannot hold the server's
    /// buffers for good.
    #[arg(long, env = "LARDER_WRITE_STALL_MS", default_value_t = 60_000)]
    pub write_stall_ms: u64,

    /// Most client connections open at once (lowered at start to what the
    /// open-file limit allows, after a reserve of 128 descriptors for data
    /// files and the cluster pool). At the cap, the connection that has
    /// waited longest for a complete request head (else the one idle
    /// longest) is closed to make room; when every connection is busy the
    /// new one is closed at once.
    #[arg(long, env = "LARDER_MAX_CONNECTIONS", default_value_t = 8192,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// Longest wait for a connection's request head, in milliseconds,
    /// from its accept or from the first byte after an idle spell; the
    /// connection is closed past it.
    #[arg(long, env = "LARDER_HEADER_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_ms: u64,

    /// Longest a keep-alive connection may stay idle between requests, in
    /// milliseconds; at least `--header-timeout-ms`.
    #[arg(long, env = "LARDER_IDLE_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,

    /// Longest a request may take, in milliseconds, before it is answered
    /// 503 `unavailable`.
    #[arg(long, env = "LARDER_REQUEST_TIMEOUT_MS", default_value_t = 30_000)]
    pub request_timeout_ms: u64,

    /// Requests served at once; more are shed at once with 503 and
    /// `Retry-After` rather than queued without bound.
    #[arg(long, env = "LARDER_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    pub max_concurrent_requests: usize,

    /// Instead of serving: ask the server at `--listen` for `/healthz` and
    /// exit 0 if it answers 200, 1 otherwise. For container health checks,
    /// where the image has no HTTP client.
    #[arg(long, default_value_t = false)]
    pub healthcheck: bool,

    /// Whether the background TTL sweeper runs. Not a flag: embedders and
    /// tests that drive expiry by hand (with a manual clock) turn it off.
    #[arg(skip = true)]
    pub run_sweeper: bool,

    /// Log every request at `info` (request id, method, route, principal,
    /// status, latency); otherwise they are logged at `debug`.
    #[arg(long, env = "LARDER_ACCESS_LOG", default_value_t = false)]
    pub access_log: bool,

    /// Seconds a graceful stop may take before the process exits anyway.
    #[arg(long, env = "LARDER_SHUTDOWN_TIMEOUT_SECS", default_value_t = 30)]
    pub shutdown_timeout_secs: u64,
}

impl Config {
    /// A configuration for tests and embedding: loopback port 0, the given
    /// data directory, everything else at its default.
    /// The environment is not read: a `LARDER_*` variable set in the shell
    /// must not change what a test runs with.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Self {
        let mut config = Config::defaults();
        config.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.data_dir = data_dir.into();
        config
    }
}

impl Config {
    /// Every setting at its documented default, ignoring the environment.
    pub fn defaults() -> Self {
        use clap::{CommandFactory, FromArgMatches};
        let command = Config::command().mut_args(|arg| arg.env(None));
        let matches = command.get_matches_from(["larder"]);
        // Cannot fail: every field has a default and nothing was passed.
        Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("admin_max_connections", &self.admin_max_connections)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_client_ca", &self.tls_client_ca)
            .field("data_dir", &self.data_dir)
            .field("sled_cache_bytes", &self.sled_cache_bytes)
            .field(
                "cluster_url",
                &self.cluster_url.as_ref().map(|_| "<redacted>"),
            )
            .field("cluster_cache_bytes", &self.cluster_cache_bytes)
            .field("cluster_poll_ms", &self.cluster_poll_ms)
            .field("cluster_staleness_ms", &self.cluster_staleness_ms)
            .field("cluster_pool_size", &self.cluster_pool_size)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("log_format", &self.log_format)
            .field("log", &self.log)
            .field("max_memory_bytes", &self.max_memory_bytes)
            .field("origin_allow", &self.origin_allow)
            .field("origin_ca", &self.origin_ca)
            .field("origin_max_inflight", &self.origin_max_inflight)
            .field("origin_breaker_failures", &self.origin_breaker_failures)
            .field("origin_breaker_ms", &self.origin_breaker_ms)
            .field("max_stale_entries", &self.max_stale_entries)
            .field("max_grouped_keys", &self.max_grouped_keys)
            .field("tokens_file", &self.tokens_file)
            .field("tokens", &self.tokens.as_ref().map(|_| "<redacted>"))
            .field("rate_limit", &self.rate_limit)
            .field("rate_limit_max_clients", &self.rate_limit_max_clients)
            .field("admin_principal", &self.admin_principal)
            .field("allow_insecure_public", &self.allow_insecure_public)
            .field("max_tables", &self.max_tables)
            .field("max_select_scan", &self.max_select_scan)
            .field("idempotency_ttl_secs", &self.idempotency_ttl_secs)
            .field("idempotency_purge_ms", &self.idempotency_purge_ms)
            .field("idempotency_max_bytes", &self.idempotency_max_bytes)
            .field("idempotency_filter_bytes", &self.idempotency_filter_bytes)
            .field("idempotency_index_entries", &self.idempotency_index_entries)
            .field("max_import_bytes", &self.max_import_bytes)
            .field("max_long_requests", &self.max_long_requests)
            .field("max_response_bytes", &self.max_response_bytes)
            .field("watch_history", &self.watch_history)
            .field("watch_history_bytes", &self.watch_history_bytes)
            .field(
                "watch_history_retention_ms",
                &self.watch_history_retention_ms,
            )
            .field("watch_heartbeat_ms", &self.watch_heartbeat_ms)
            .field("write_stall_ms", &self.write_stall_ms)
            .field("max_connections", &self.max_connections)
            .field("header_timeout_ms", &self.header_timeout_ms)
            .field("idle_timeout_ms", &self.idle_timeout_ms)
            .field("request_timeout_ms", &self.request_timeout_ms)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("access_log", &self.access_log)
            .field("healthcheck", &self.healthcheck)
            .field("run_sweeper", &self.run_sweeper)
            .field("shutdown_timeout_secs", &self.shutdown_timeout_secs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_ignore_the_environment() {
        // The variable is set in a child process so this test cannot
        // change what other tests in this process see.
        if std::env::var_os("LARDER_DEFAULTS_PROBE").is_some() {
            let c = Config::defaults();
            assert_eq!(c.max_tables, 1000);
            assert_eq!(c.data_dir, PathBuf::from("./data"));
            assert!(c.tokens.is_none());
            return;
        }
        let exe = std::env::current_exe().unwrap();
        let status = std::process::Command::new(exe)
            .args(["--exact", "config::tests::defaults_ignore_the_environment"])
            .env("LARDER_DEFAULTS_PROBE", "1")
            .env("LARDER_MAX_TABLES", "3")
            .env("LARDER_DATA_DIR", "/elsewhere")
            .env("LARDER_TOKENS", "alice:abcdefghijkl")
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn debug_output_never_shows_tokens() {
        let mut c = Config::for_tests("/tmp/x");
        c.tokens = Some("alice:supersecret-token".into());
        let shown = format!("{c:?}");
        assert!(!shown.contains("supersecret"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }
}
