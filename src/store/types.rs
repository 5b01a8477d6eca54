//! The table settings clients choose at creation: type, access, persistence,
//! eviction and the read-through origin. These are plain data with serde and
//! OpenAPI derives, shared by the store, the API and the durable tier.
//!
//! [`TableSettings`] is the one declaration of a table setting: the create
//! body, table info and the stored definition all embed it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The four ETS table types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum TableType {
    /// One object per key; a write replaces it.
    #[default]
    Set,
    /// Like `set`, and keys are kept in bytewise order for range scans.
    OrderedSet,
    /// Many objects per key, no two identical.
    Bag,
    /// Many objects per key, duplicates allowed.
    DuplicateBag,
}

impl TableType {
    /// Whether a key holds one object (`set`, `ordered_set`) rather than a list.
    pub fn is_single(self) -> bool {
        matches!(self, TableType::Set | TableType::OrderedSet)
    }
}

/// Who may read and write a table, as in ETS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Every principal reads and writes.
    Public,
    /// Every principal reads; only the owner writes.
    #[default]
    Protected,
    /// Only the owner reads and writes.
    Private,
}

/// Where a table's data lives and what a crash may lose.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Persistence {
    /// Memory only, like ETS: gone on restart.
    #[default]
    None,
    /// Written back at most `auto_save_ms` after a change, like DETS `auto_save`.
    Periodic,
    /// Acknowledged only once durable on disk.
    Sync,
    /// Lives in PostgreSQL, shared by every node started with the same
    /// `--cluster-url`; acknowledged once committed there.
    Cluster,
}

impl Persistence {
    /// Whether this node's durable tier (sled) keeps the table.
    pub fn is_local_durable(self) -> bool {
        matches!(self, Persistence::Periodic | Persistence::Sync)
    }
}

/// What a table does when a write would pass `max_entries`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Eviction {
    /// Refuse the write with 507 `table_full`.
    #[default]
    None,
    /// Evict the least recently used keys to make room.
    Lru,
}

/// A read-through source consulted when a `GET` misses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Origin {
    /// URL template, `http://` or `https://` (verified against the system's
    /// roots plus `--origin-ca`); `{key}` is replaced by the
    /// percent-encoded key.
    #[schema(example = "http://127.0.0.1:9000/users/{key}")]
    pub url: String,
    /// TTL given to values fetched from the origin, in milliseconds.
    #[serde(default = "Origin::default_ttl_ms")]
    pub ttl_ms: u64,
    /// How long an origin 404 is remembered, in milliseconds.
    #[serde(default = "Origin::default_negative_ttl_ms")]
    pub negative_ttl_ms: u64,
    /// How long to wait for the origin before answering 504, in milliseconds.
    #[serde(default = "Origin::default_timeout_ms")]
    pub timeout_ms: u64,
    /// Headers sent with every fetch (an API key, say). Each value is a
    /// template in which `${LARDER_ORIGIN_…}` is replaced by that
    /// environment variable, read at start and at every `SIGHUP`; table
    /// info and export show the template, never the value. A variable not
    /// set when the table is created is a 400; one gone later makes
    /// fetches 502. At most 16.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    #[schema(example = json!({"X-Api-Key": "${LARDER_ORIGIN_USERS_KEY}"}))]
    pub headers: std::collections::BTreeMap<String, String>,
    /// A hit on a fetched entry with at most this many ms of TTL left is
    /// answered at once and refreshed from the origin in the background,
    /// one refresh per key at a time (less than `ttl_ms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_ahead_ms: Option<u64>,
    /// An entry that expires is kept this many ms more, out of sight of
    /// reads, scans, select and size, and a `GET` whose fetch fails (5xx,
    /// timeout, connection error, open breaker) is answered with it and
    /// `X-Cache: STALE` (RFC 5861's stale-if-error). Copies are this
    /// node's, kept in memory: a restart forgets them. Not on cluster
    /// tables (400).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_if_error_ms: Option<u64>,
}

impl Origin {
    fn default_ttl_ms() -> u64 {
        60_000
    }
    fn default_negative_ttl_ms() -> u64 {
        5_000
    }
    fn default_timeout_ms() -> u64 {
        2_000
    }
}

// The one declaration of a table setting: the create body, table info and
// the stored definition embed this struct, so a new setting is declared
// here once (plus its check in `TableSpec::validated`, and its live copy in
// `Table` if `PATCH` may change it) and reaches the API, the OpenAPI
// document and the disk by itself. No `deny_unknown_fields`: the struct is
// flattened into others, where serde cannot refuse members and the schema's
// `additionalProperties: false` would forbid the outer struct's own members;
// the create handler refuses unknown members with `member_names`.
/// A table's settings. Every one has a default.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct TableSettings {
    /// Table type; default `set`.
    #[serde(rename = "type", default)]
    pub kind: TableType,
    /// Access level; default `protected`.
    #[serde(default)]
    pub access: Access,
    /// Durability; default `none`.
    #[serde(default)]
    pub persistence: Persistence,
    /// `periodic` only: longest time an acknowledged write may stay only in
    /// memory, in milliseconds; default 1000.
    #[serde(default)]
    pub auto_save_ms: Option<u64>,
    /// Entries expire this long after their last write, in milliseconds.
    #[serde(default)]
    pub default_ttl_ms: Option<u64>,
    /// Most objects the table may hold.
    #[serde(default)]
    pub max_entries: Option<u64>,
    /// At `max_entries`: `none` refuses with 507, `lru` evicts.
    #[serde(default)]
    pub eviction: Eviction,
    /// Read-through source (admins only).
    #[serde(default)]
    pub origin: Option<Origin>,
    /// HTTP caching of entry answers: `public` adds `public` to their
    /// `Cache-Control`, so shared caches in front of a server that needs
    /// tokens may keep them; default `default`. Set at creation.
    #[serde(default)]
    pub cache: CacheScope,
    /// What entries may hold: `json` (default) or `any`, which also keeps
    /// raw bytes with their content type (set and ordered_set tables
    /// only). Set at creation.
    #[serde(default)]
    pub values: ValueKind,
}

/// What a table's entries may hold: the table setting `values`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum ValueKind {
    /// JSON only: every body is parsed as JSON, whatever its
    /// `Content-Type`.
    #[default]
    Json,
    /// JSON, and raw bytes: a body whose `Content-Type` is not a JSON type
    /// is kept as it is, with that type, and a `GET` answers it as sent.
    Any,
}

/// Who may keep a table's entry answers: the table setting `cache`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum CacheScope {
    /// HTTP's default: a shared cache does not keep answers to requests
    /// that carried a token.
    #[default]
    Default,
    /// Any cache may keep them (`Cache-Control: public`).
    Public,
}

impl TableSettings {
    /// The names of the settings, as they appear in JSON.
    pub fn member_names() -> Vec<String> {
        match serde_json::to_value(TableSettings::default()) {
            Ok(serde_json::Value::Object(members)) => members.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }
}

/// How long an inserted object lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// `ttl_ms` from now; `None` takes the table's `default_ttl_ms`.
    After(Option<u64>),
    /// Until this Unix-ms deadline (0: never), whatever the table's
    /// default: what an import restores.
    At(u64),
}
