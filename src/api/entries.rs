//! Entry endpoints: the ETS object operations on one key, bulk insert, scans
//! and clear.

use super::direct::ApiRoutes;
use crate::api_routes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Op, Principal};
use super::extract::{
    checked_key, from_object, parse_json, Conditions, ContentType, EntryPath, JsonBody,
    QueryParams, RawBody, TablePath,
};
use super::raw;
use super::respond::{
    self, entry_body, scan_body, with_cache, with_cache_control, with_etag, with_last_modified,
    HIT, MISS, STALE,
};
use super::AppState;
use crate::api::error::{ApiError, ApiResult, ErrorBody};
use crate::ops::{ReadFrom, TableOps};
use crate::store::{check_ttl_ms, Cursor, ScanRequest, Value, DEFAULT_SCAN_LIMIT};

/// Routes for `/v1/tables/{table}/entries…`.
pub fn router() -> ApiRoutes {
    ApiRoutes::new()
        .routes(api_routes!(
            get_entry,
            head_entry,
            put_entry,
            delete_entry,
            patch_entry
        ))
        .routes(api_routes!(scan_entries, insert_entries, clear_entries))
        .routes(api_routes!(delete_object))
        .routes(api_routes!(take_entry))
}

/// A set/ordered_set entry as `GET` returns it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"key": "alice", "value": {"age": 31}, "ttl_ms": null}))]
pub struct EntryDoc {
    /// The key.
    pub key: String,
    /// The stored JSON value (bag types return `values` instead).
    pub value: serde_json::Value,
    /// For bag types: every object under the key, in insertion order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<serde_json::Value>>,
    /// Milliseconds until the entry expires; null when it does not.
    pub ttl_ms: Option<u64>,
}

/// What a `PUT` did.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"key": "alice", "created": true}))]
pub struct PutResult {
    /// The key written.
    pub key: String,
    /// Whether the key was new (201) rather than updated (200).
    pub created: bool,
}

/// Query of `PUT`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PutParams {
    /// Expire the entry this many milliseconds from now (1 to ten years).
    /// Without it the table's `default_ttl_ms` applies, or no expiry.
    pub ttl_ms: Option<u64>,
}

/// One item of a bulk insert.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"key": "alice", "value": {"age": 31}, "ttl_ms": 60000}))]
pub struct BulkItem {
    /// The key.
    pub key: String,
    /// Any JSON value.
    pub value: serde_json::Value,
    /// Optional TTL in milliseconds.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
}

/// Result of a bulk insert.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"inserted": 2}))]
pub struct Inserted {
    /// Items applied.
    pub inserted: usize,
}

/// Query of a scan.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ScanParams {
    /// Only keys starting with this (every table type).
    pub prefix: Option<String>,
    /// ordered_set: lowest key, inclusive.
    pub start: Option<String>,
    /// ordered_set: lowest key, exclusive (`next(k)` is `after=k&limit=1`).
    pub after: Option<String>,
    /// ordered_set: highest key, exclusive.
    pub end: Option<String>,
    /// Most objects to return: 1 to 10000, default 100.
    pub limit: Option<usize>,
    /// ordered_set: walk the range from its high end.
    pub reverse: Option<bool>,
    /// `next_cursor` of the previous page; send the same filters with it.
    pub cursor: Option<String>,
    /// Cluster tables: read from PostgreSQL rather than this node's copy.
    /// Scans of cluster tables always do; accepted on every table.
    pub consistent: Option<bool>,
}

/// Query of an entry `GET`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReadParams {
    /// Cluster tables: read from PostgreSQL, never from this node's hot
    /// copy, so the answer reflects every write acknowledged before it
    /// (etcd's linearizable read). Local tables are always read that way.
    pub consistent: Option<bool>,
}

impl ReadParams {
    fn read_from(&self) -> ReadFrom {
        if self.consistent == Some(true) {
            ReadFrom::Primary
        } else {
            ReadFrom::Nearest
        }
    }
}

/// One page of a scan.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"entries": [{"key": "a", "value": 1}], "next_cursor": null}))]
pub struct ScanResult {
    /// Objects in scan order; bag keys appear once per object.
    pub entries: Vec<ScanItem>,
    /// Pass back as `cursor` to continue; null exactly when the scan is complete.
    pub next_cursor: Option<String>,
}

/// A raw value's bytes, in a request or an answer (OpenAPI only).
#[derive(ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct RawBytes(pub Vec<u8>);

/// One object of a scan page.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScanItem {
    /// The key.
    pub key: String,
    /// The object.
    pub value: serde_json::Value,
}

/// An entry `GET`'s 200: raw bytes as they were written, or the entry's
/// JSON; with its `ETag` and `Last-Modified`.
fn entry_answer(raw_values: bool, key: &str, entry: &crate::store::Entry) -> Response {
    let resp = raw::raw_answer(raw_values, entry)
        .unwrap_or_else(|| respond::json(StatusCode::OK, entry_body(key, entry)));
    with_last_modified(with_etag(resp, entry.version), entry.modified)
}

/// After a read-through fetch failed with `e`: the key's stale copy when
/// the origin failed (or its breaker is open) and one is kept, else `e`. An
/// origin's 404 drops the copy: nothing of a key the origin lost may come
/// back stale.
fn failed_fetch(meta: &crate::store::Table, key: &str, e: ApiError) -> Result<Response, ApiError> {
    match e {
        ApiError::OriginError(_) | ApiError::OriginTimeout | ApiError::OriginUnavailable(_) => {
            let Some(stale) = meta.stale_copy(key) else {
                return Err(e);
            };
            meta.stats
                .stale_served
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Ok(entry_answer(meta.raw_values(), key, &stale))
        }
        ApiError::KeyNotFound => {
            meta.forget_stale(key);
            Err(e)
        }
        e => Err(e),
    }
}

/// Look up a key.
///
/// ETS `lookup/2`. Set types answer `{"key","value","ttl_ms"}`, bag types
/// `{"key","values","ttl_ms"}` with objects in insertion order. On a
/// `"values": "any"` table, a raw value is answered as its bytes with the
/// `Content-Type` it was written with. Sends an
/// `ETag`; `If-None-Match` with a current tag answers 304. `X-Cache` says
/// whether the answer came from memory (`HIT`) or not (`MISS`).
/// `Last-Modified` is the whole second of the key's last write (kept across
/// restarts, the same on every cluster node); `If-Modified-Since` answers
/// 304 when the entry was not written after it, unless `If-None-Match` is
/// also sent, which then decides alone. `Cache-Control` is
/// `max-age=<whole seconds of TTL left>` for an entry with a TTL and
/// `no-cache` for one without (and on 404, errors and stale answers), with
/// `public` first on a table created with `"cache": "public"`.
///
/// On a table with an `origin`, a miss fetches `origin.url` with the key
/// percent-encoded into `{key}`: a 200 JSON body is stored with
/// `origin.ttl_ms` and returned; a 404 is answered 404 and remembered for
/// `origin.negative_ttl_ms` (served from memory, `X-Cache: HIT`, until
/// then); any other answer is 502 `origin_error`, and no answer within
/// `origin.timeout_ms` is 504 `origin_timeout`. Concurrent misses on one key
/// make a single origin request. `origin.headers` are sent with each
/// fetch, `${LARDER_ORIGIN_…}` filled from the server's environment (an
/// unset variable: 502). At most `--origin-max-inflight` fetches go to one
/// origin (host and port) at once; after `--origin-breaker-failures`
/// failures in a row (5xx, timeouts, connection errors; a 404 is an
/// answer) the origin is not called for `--origin-breaker-ms`: misses get
/// 503 `origin_unavailable` at once, then one trial fetch closes or reopens
/// the breaker. With `origin.refresh_ahead_ms`, a hit that close to expiry
/// is answered at once and the key refreshed in the background (once per
/// key; a client's write made meanwhile wins). With
/// `origin.stale_if_error_ms`, a miss whose fetch fails (or finds the
/// breaker open) is answered with the expired copy kept that long, with
/// `X-Cache: STALE` and `Cache-Control: no-cache`. A request with
/// `Cache-Control: no-cache` from a principal that may write the table
/// skips the cached copy and fetches from the origin (sharing a fetch in
/// flight), replacing the entry unless a client wrote it meanwhile; others'
/// `no-cache` is ignored.
#[utoipa::path(
    get,
    path = "/v1/tables/{table}/entries/{key}",
    tag = "entries",
    params(("table" = String, Path, description = "Table name"), ("key" = String, Path, description = "Key, percent-encoded"), ReadParams,
           ("If-None-Match" = Option<String>, Header, description = "Answer 304 if the entry still has this ETag"),
           ("If-Modified-Since" = Option<String>, Header, description = "An HTTP date: answer 304 if the entry was not written after it (ignored when If-None-Match is sent)")),
    responses(
        (status = 200, description = "The entry; a raw value as its bytes, with its own Content-Type", content(
            (EntryDoc = "application/json"),
            (RawBytes = "*/*"),
        ), headers(("ETag" = String), ("X-Cache" = String), ("Last-Modified" = String))),
        (status = 304, description = "Not modified since the given ETag or date"),
        (status = 400, description = "Invalid table name or key", body = ErrorBody),
        (status = 403, description = "Not allowed to read the table", body = ErrorBody),
        (status = 404, description = "No such table, or the key is absent or expired", body = ErrorBody),
        (status = 502, description = "The origin failed", body = ErrorBody),
        (status = 504, description = "The origin did not answer in time", body = ErrorBody),
    )
)]
pub async fn get_entry(
    State(state): State<AppState>,
    who: Principal,
    EntryPath(table, key): EntryPath,
    QueryParams(params): QueryParams<ReadParams>,
    conditions: Conditions,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Read).await?;
    let if_none = conditions.if_none_match?;
    let public = table.meta().cache_public();
    let found = table.lookup(&key, params.read_from()).await?;
    // A writer's `Cache-Control: no-cache` asks the origin even on a hit;
    // anyone else's is ignored.
    let refetch = conditions.no_cache
        && table.meta().origin().is_some()
        && super::auth::authorize(table.meta(), &who, Op::Write).is_ok();
    let entry = match found {
        Some(entry) if !refetch => entry,
        found => {
            let absent = |status| {
                with_cache_control(
                    with_cache(ApiError::KeyNotFound.into_response(), status),
                    None,
                    public,
                )
            };
            let Some(origin) = table.meta().origin() else {
                return Ok(absent(MISS));
            };
            if !refetch
                && state
                    .origins
                    .remembered_missing(table.meta(), &key, table.meta().now())
            {
                return Ok(absent(HIT));
            }
            let replacing = found.map(|e| e.version);
            // Boxed: the origin fetch's future is large and rare; inline it
            // would grow every GET's future, which is moved on each request.
            let fetch = Box::pin(state.origins.read_through(&table, &key, origin, replacing));
            let resp = match fetch.await {
                Ok(entry) => with_cache_control(
                    entry_answer(table.meta().raw_values(), &key, &entry),
                    entry.ttl_ms,
                    public,
                ),
                Err(e) => match failed_fetch(table.meta(), &key, e) {
                    Ok(stale) => {
                        let resp = with_cache_control(stale, None, public);
                        return Ok(with_cache(resp, STALE));
                    }
                    Err(e) => with_cache_control(e.into_response(), None, public),
                },
            };
            return Ok(with_cache(resp, MISS));
        }
    };
    let since = conditions.if_modified_since;
    if respond::not_modified(if_none.as_ref(), since, entry.version, entry.modified) {
        let resp = with_etag(respond::empty(StatusCode::NOT_MODIFIED), entry.version);
        let resp = with_last_modified(resp, entry.modified);
        return Ok(with_cache(
            with_cache_control(resp, entry.ttl_ms, public),
            HIT,
        ));
    }
    state
        .origins
        .refresh_ahead(&state, table.meta(), &key, entry.version, entry.ttl_ms);
    let resp = entry_answer(table.meta().raw_values(), &key, &entry);
    let resp = with_cache_control(resp, entry.ttl_ms, public);
    Ok(with_cache(resp, HIT))
}

/// Test whether a key exists.
///
/// ETS `member/2`: 200 when the key is present and live, 404 otherwise; no body.
/// Looks in memory only: on a table with an `origin`, HEAD never fetches.
#[utoipa::path(
    head,
    path = "/v1/tables/{table}/entries/{key}",
    tag = "entries",
    params(("table" = String, Path, description = "Table name"), ("key" = String, Path, description = "Key, percent-encoded"), ReadParams),
    responses(
        (status = 200, description = "The key exists", headers(("ETag" = String))),
        (status = 404, description = "The key or table does not exist"),
    )
)]
pub async fn head_entry(
    State(state): State<AppState>,
    who: Principal,
    EntryPath(table, key): EntryPath,
    QueryParams(params): QueryParams<ReadParams>,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Read).await?;
    match table.peek(&key, params.read_from()).await? {
        Some(entry) => Ok(with_last_modified(
            with_etag(respond::empty(StatusCode::OK), entry.version),
            entry.modified,
        )),
        None => Ok(respond::empty(StatusCode::NOT_FOUND)),
    }
}

/// Insert an object.
///
/// ETS `insert/2`. The body is the value itself, any JSON. On a table
/// created with `"values": "any"`, a body whose `Content-Type` is not JSON
/// (JSON types: none, `application/json`, `application/*+json`,
/// `application/x-www-form-urlencoded`) is stored as raw bytes with that
/// type, and a JSON body `{"$bytes": "<base64>", "content_type": "…"}`
/// stores those bytes (bad base64: 400); JSON views (scans, select,
/// lookup, export, watch, transactions) show raw values in that form.
/// set/ordered_set
/// replace; `bag` adds unless an identical value is stored under the key;
/// `duplicate_bag` always adds. `If-None-Match: *` is `insert_new` (412 if the
/// key exists); `If-Match: "<etag>"` is compare-and-swap (412 if the entry
/// changed or is absent). A write without `ttl_ms` takes the table's
/// `default_ttl_ms`, or clears any expiry. On a `sync` table the response is
/// sent once the write is on disk; on a `periodic` table it reaches disk
/// within `auto_save_ms`.
#[utoipa::path(
    put,
    path = "/v1/tables/{table}/entries/{key}",
    tag = "entries",
    params(("table" = String, Path, description = "Table name"), ("key" = String, Path, description = "Key, percent-encoded"), PutParams,
           ("If-None-Match" = Option<String>, Header, description = "`*`: insert only if absent"),
           ("If-Match" = Option<String>, Header, description = "Write only if the entry has this ETag (or exists, for `*`)")),
    request_body(content(
        (serde_json::Value = "application/json", example = json!({"name": "Alice", "age": 31})),
        (RawBytes = "application/octet-stream"),
    ), description = "The value, any JSON; raw bytes of any type on a `\"values\": \"any\"` table"),
    responses(
        (status = 200, description = "Updated", body = PutResult, headers(("ETag" = String))),
        (status = 201, description = "Created", body = PutResult, headers(("ETag" = String))),
        (status = 400, description = "Invalid JSON, key, name or ttl_ms", body = ErrorBody),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
        (status = 412, description = "Precondition failed", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 507, description = "Table full", body = ErrorBody),
    )
)]
pub async fn put_entry(
    State(state): State<AppState>,
    who: Principal,
    EntryPath(table, key): EntryPath,
    QueryParams(params): QueryParams<PutParams>,
    conditions: Conditions,
    ContentType(content_type): ContentType,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Write).await?;
    if let Some(ttl) = params.ttl_ms {
        check_ttl_ms(ttl)?;
    }
    let pre = conditions.for_write()?;
    let value = raw::body_value(table.meta().raw_values(), content_type.as_ref(), &body)?;
    let written = table.insert(&key, value, params.ttl_ms, &pre).await?;
    let status = if written.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut buf = Vec::with_capacity(key.len() + 32);
    buf.extend_from_slice(b"{\"key\":");
    respond::push_str(&mut buf, &key);
    buf.extend_from_slice(if written.created {
        b",\"created\":true}"
    } else {
        b",\"created\":false}"
    });
    Ok(with_etag(respond::json(status, buf), written.version))
}

/// Delete a key.
///
/// ETS `delete/2`: removes every object under the key. 204 also when the key
/// was absent. `If-Match` makes the delete conditional.
#[utoipa::path(
    delete,
    path = "/v1/tables/{table}/entries/{key}",
    tag = "entries",
    params(("table" = String, Path, description = "Table name"), ("key" = String, Path, description = "Key, percent-encoded"),
           ("If-Match" = Option<String>, Header, description = "Delete only if the entry has this ETag")),
    responses(
        (status = 204, description = "Deleted, or was absent"),
        (status = 400, description = "Invalid key or name", body = ErrorBody),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
        (status = 412, description = "Precondition failed", body = ErrorBody),
    )
)]
pub async fn delete_entry(
    State(state): State<AppState>,
    who: Principal,
    EntryPath(table, key): EntryPath,
    conditions: Conditions,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Write).await?;
    let pre = conditions.for_write()?;
    table.delete(&key, &pre).await?;
    Ok(respond::empty(StatusCode::NO_CONTENT))
}

/// Merge-patch an object value.
///
/// ETS `update_element/3`, as a JSON Merge Patch (RFC 7396) applied
/// atomically. The body must be a JSON object; the stored value must be an
/// object too (else 409 `not_an_object`). set/ordered_set only (409
/// `wrong_table_type`). Keeps the entry's expiry unless the table has a
/// `default_ttl_ms`, which restarts it.
#[utoipa::path(
    patch,
    path = "/v1/tables/{table}/entries/{key}",
    tag = "entries",
    params(("table" = String, Path, description = "Table name"), ("key" = String, Path, description = "Key, percent-encoded"),
           ("If-Match" = Option<String>, Header, description = "Patch only if the entry has this ETag")),
    request_body(content = serde_json::Value, description = "A JSON Merge Patch object", example = json!({"age": 32, "nickname": null})),
    responses(
        (status = 200, description = "The patched entry", body = EntryDoc, headers(("ETag" = String))),
        (status = 400, description = "Invalid JSON, or the patch is not an object", body = ErrorBody),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table or key", body = ErrorBody),
        (status = 409, description = "Not an object, or a bag table", body = ErrorBody),
        (status = 412, description = "Precondition failed", body = ErrorBody),
    )
)]
pub async fn patch_entry(
    State(state): State<AppState>,
    who: Principal,
    EntryPath(table, key): EntryPath,
    conditions: Conditions,
    JsonBody(patch): JsonBody<serde_json::Value>,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Write).await?;
    let pre = conditions.for_write()?;
    if !patch.is_object() {
        return Err(ApiError::InvalidArgument(
            "a merge patch must be a JSON object".into(),
        ));
    }
    let entry = table.merge(&key, &patch, &pre).await?;
    Ok(with_etag(
        respond::json(StatusCode::OK, entry_body(&key, &entry)),
        entry.version,
    ))
}

/// Delete one object.
///
/// ETS `delete_object/2`: the body is a value; removes exactly that object
/// under the key (every identical copy in a `duplicate_bag`). 204 whether or
/// not it was there.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/entries/{key}/delete_object",
    tag = "entries",
    params(("table" = String, Path, description = "Table name"), ("key" = String, Path, description = "Key, percent-encoded")),
    request_body(content = serde_json::Value, description = "The object to remove", example = json!("red")),
    responses(
        (status = 204, description = "Removed, or was not there"),
        (status = 400, description = "Invalid JSON, key or name", body = ErrorBody),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn delete_object(
    State(state): State<AppState>,
    who: Principal,
    EntryPath(table, key): EntryPath,
    ContentType(content_type): ContentType,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Write).await?;
    let value = raw::body_value(table.meta().raw_values(), content_type.as_ref(), &body)?;
    table.delete_object(&key, &value).await?;
    Ok(respond::empty(StatusCode::NO_CONTENT))
}

/// Remove and return a key.
///
/// ETS `take/2`: removes the key and answers with what it held, as `GET`
/// would. 404 when absent.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/entries/{key}/take",
    tag = "entries",
    params(("table" = String, Path, description = "Table name"), ("key" = String, Path, description = "Key, percent-encoded")),
    responses(
        (status = 200, description = "The removed entry", body = EntryDoc),
        (status = 400, description = "Invalid key or name", body = ErrorBody),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table or key", body = ErrorBody),
    )
)]
pub async fn take_entry(
    State(state): State<AppState>,
    who: Principal,
    EntryPath(table, key): EntryPath,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Write).await?;
    let entry = table.take(&key).await?.ok_or(ApiError::KeyNotFound)?;
    Ok(respond::json(StatusCode::OK, entry_body(&key, &entry)))
}

/// Insert many objects.
///
/// ETS `insert/2` with a list. Every item is validated before anything is
/// written; if one cannot be stored (table full) the items before it are
/// undone, so the request changes all or nothing. Items apply in order: with
/// repeated keys in a set table the last one wins.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/entries",
    tag = "entries",
    params(("table" = String, Path, description = "Table name")),
    request_body(content = Vec<BulkItem>, description = "Objects to insert"),
    responses(
        (status = 200, description = "All items inserted", body = Inserted),
        (status = 400, description = "Some item is invalid; nothing was written", body = ErrorBody),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
        (status = 507, description = "Table full; nothing was written", body = ErrorBody),
    )
)]
pub async fn insert_entries(
    State(state): State<AppState>,
    who: Principal,
    TablePath(table): TablePath,
    RawBody(body): RawBody,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Write).await?;
    let batch = match bulk_items_borrowed(&body) {
        Some(items) => borrowed_batch(items, table.meta().raw_values())?,
        None => owned_batch(parse_json(&body)?, table.meta().raw_values())?,
    };
    let inserted = table.insert_many(batch).await?;
    respond::serialized(StatusCode::OK, &Inserted { inserted })
}

/// One item of a bulk insert, borrowed from the body: reading a batch
/// this way leaves one allocation per item behind (the stored value)
/// instead of a parsed tree per item, whose freed blocks, interleaved
/// with the stored values, the allocator could not give back (a million
/// entries loaded 4,000 per request kept about 25 bytes per entry more
/// resident).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkItemRef<'a> {
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    value: &'a serde_json::value::RawValue,
    #[serde(default)]
    ttl_ms: Option<u64>,
}

/// The items of a well-formed bulk body, borrowed; `None` when the body
/// is not one (the owned reading then names what is wrong, and where).
fn bulk_items_borrowed(body: &[u8]) -> Option<Vec<BulkItemRef<'_>>> {
    let items: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body).ok()?;
    crate::json::check_unique_members(body).ok()?;
    items
        .into_iter()
        // serde would also read an item from an array of its fields in
        // order; only an object is an item.
        .map(|item| {
            let text = item.get();
            text.starts_with('{')
                .then(|| serde_json::from_str(text).ok())
                .flatten()
        })
        .collect()
}

type Batch = Vec<(String, Value, crate::store::Expiry)>;

fn borrowed_batch(items: Vec<BulkItemRef<'_>>, raw_values: bool) -> ApiResult<Batch> {
    let mut batch = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let value = Value::parse(item.value.get().as_bytes())
            .map_err(|e| ApiError::InvalidArgument(format!("item {i}: {e}")))?;
        batch.push(bulk_entry(
            i,
            item.key.into_owned(),
            value,
            item.ttl_ms,
            raw_values,
        )?);
    }
    Ok(batch)
}

fn owned_batch(
    items: Vec<serde_json::Map<String, serde_json::Value>>,
    raw_values: bool,
) -> ApiResult<Batch> {
    let mut batch = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let item: BulkItem = from_object(item).map_err(|e| match e {
            ApiError::InvalidArgument(m) => ApiError::InvalidArgument(format!("item {i}: {m}")),
            other => other,
        })?;
        let value = Value::from_json(&item.value);
        batch.push(bulk_entry(i, item.key, value, item.ttl_ms, raw_values)?);
    }
    Ok(batch)
}

/// Item `i` of a bulk insert, checked.
fn bulk_entry(
    i: usize,
    key: String,
    value: Value,
    ttl_ms: Option<u64>,
    raw_values: bool,
) -> ApiResult<(String, Value, crate::store::Expiry)> {
    let key = checked_key(key).map_err(|e| match e {
        ApiError::InvalidKey(m) => ApiError::InvalidKey(format!("item {i}: {m}")),
        other => other,
    })?;
    if let Some(ttl) = ttl_ms {
        check_ttl_ms(ttl).map_err(|e| ApiError::InvalidArgument(format!("item {i}: {e}")))?;
    }
    let value = raw::accept(raw_values, value)
        .map_err(|e| ApiError::InvalidArgument(format!("item {i}: {}", e.message())))?;
    Ok((key, value, crate::store::Expiry::After(ttl_ms)))
}

/// Scan entries.
///
/// ETS `first`/`next`/`select` with a limit. ordered_set walks keys in
/// bytewise order within `start`/`after`/`end`/`prefix`, backwards with
/// `reverse=true`: first is `limit=1`, last `reverse=true&limit=1`, next(k)
/// `after=k&limit=1`, prev(k) `end=k&reverse=true&limit=1`. Other types take
/// only `prefix` and promise no order. Every type pages with `next_cursor`
/// (null exactly when the scan is complete), and a scan running while the
/// table changes returns every entry that lived throughout it exactly once.
/// Cursors stay valid while the server runs. A page may hold fewer entries
/// than `limit` (even none) with a non-null cursor: it ends before
/// `--max-response-bytes` of JSON, and a walk over many entries that do not
/// match gives its worker back and stops before the request deadline.
#[utoipa::path(
    get,
    path = "/v1/tables/{table}/entries",
    tag = "entries",
    params(("table" = String, Path, description = "Table name"), ScanParams),
    responses(
        (status = 200, description = "One page", body = ScanResult),
        (status = 422, description = "result_too_large: the page's first entry alone is over --max-response-bytes; error.key names it and error.next_cursor continues past it", body = ErrorBody),
        (status = 400, description = "Bad parameters (range options on a hashed table, limit out of range, bad cursor)", body = ErrorBody),
        (status = 403, description = "Not allowed to read the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn scan_entries(
    State(state): State<AppState>,
    who: Principal,
    TablePath(table): TablePath,
    QueryParams(params): QueryParams<ScanParams>,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Read).await?;
    let req = ScanRequest {
        prefix: params.prefix.filter(|p| !p.is_empty()),
        start: params.start,
        after: params.after,
        end: params.end,
        limit: params.limit.unwrap_or(DEFAULT_SCAN_LIMIT),
        reverse: params.reverse.unwrap_or(false),
        cursor: params.cursor.as_deref().map(Cursor::decode).transpose()?,
    };
    req.check_bounds()?;
    let from = ReadParams {
        consistent: params.consistent,
    }
    .read_from();
    // A page may come in several steps (a hashed table stops each one at
    // the end of a shard after a while): the worker is given back between
    // steps, and at the deadline the page ends where it got to.
    let mut pace = super::scope::pace();
    let mut page = table.scan(&req, from).await?;
    while page.items.len() < req.limit {
        let Some(cursor) = page.next_cursor.clone() else {
            break;
        };
        if !pace.tick().await {
            break;
        }
        let step = ScanRequest {
            limit: req.limit - page.items.len(),
            cursor: Some(cursor),
            ..req.clone()
        };
        let more = table.scan(&step, from).await?;
        page.items.extend(more.items);
        page.positions.extend(more.positions);
        page.deadlines.extend(more.deadlines);
        page.next_cursor = more.next_cursor;
    }
    let body = scan_body(&page, state.limits.max_response_bytes)?;
    Ok(respond::json(StatusCode::OK, body))
}

/// Delete every object.
///
/// ETS `delete_all_objects/1`: empties the table, keeping its settings, in
/// one step whatever it holds (one revision, one `clear` event; the
/// objects are freed in the background, and a durable table saves one
/// "cleared" mark rather than a removal per key).
#[utoipa::path(
    delete,
    path = "/v1/tables/{table}/entries",
    tag = "entries",
    params(("table" = String, Path, description = "Table name")),
    responses(
        (status = 204, description = "Emptied"),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn clear_entries(
    State(state): State<AppState>,
    who: Principal,
    TablePath(table): TablePath,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Write).await?;
    table.clear().await?;
    Ok(respond::empty(StatusCode::NO_CONTENT))
}
