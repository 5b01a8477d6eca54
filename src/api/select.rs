//! ETS `select/3`, `select_count/2`, `select_delete/2` with JSON match
//! specifications, and multi-get (`lookup`), over HTTP.

use super::direct::ApiRoutes;
use crate::api_routes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use serde_json::{Map, Value as Json};
use utoipa::ToSchema;

use super::auth::{Op, Principal};
use super::extract::{checked_key, parse_json, RawBody, TablePath};
use super::respond;
use super::AppState;
use crate::api::error::{ApiError, ApiResult, ErrorBody};
use crate::ops::{ReadFrom, TableOps};
use crate::select::{self, MatchSpec, SelectMode, Walk};
use crate::store::{Cursor, ScanRequest, DEFAULT_SCAN_LIMIT, MAX_SCAN_LIMIT};

/// Routes for select and multi-get.
pub fn router() -> ApiRoutes {
    ApiRoutes::new()
        .routes(api_routes!(select_objects))
        .routes(api_routes!(select_count))
        .routes(api_routes!(select_delete))
        .routes(api_routes!(lookup_many))
}

/// Most keys in one multi-get.
const MAX_LOOKUP_KEYS: usize = 1000;

/// A select request (documentation of the body; it is read by hand so that
/// every mistake can be named precisely).
#[derive(Debug, ToSchema)]
#[schema(example = json!({
    "match": {"key": "$k", "value": {"status": "active", "age": "$a"}},
    "where": ["and", [">=", "$a", 18], ["is_integer", "$a"]],
    "return": {"user": "$k", "age": "$a"},
    "range": {"prefix": "user:"},
    "limit": 100
}))]
pub struct SelectBody {
    /// Pattern over each object `{"key": k, "value": v}`: `"_"` matches
    /// anything, `"$name"` binds a variable, an object pattern matches an
    /// object with at least its members, an array pattern an array of the
    /// same length; `{"$const": x}` is the literal `x`. Default `"_"`.
    #[schema(value_type = Object)]
    pub r#match: Option<Json>,
    /// One guard, `[op, args…]`; the operators are `and`, `or`, `andalso`,
    /// `orelse`, `not`, `==`, `!=`, `<`, `<=`, `>`, `>=`, `+`, `-`, `*`,
    /// `div`, `rem`, `size`, `get` and the type tests `is_null`,
    /// `is_boolean`, `is_number`, `is_integer`, `is_string`, `is_array`,
    /// `is_object`.
    #[schema(value_type = Object)]
    pub r#where: Option<Json>,
    /// `"$_"` (the object, default), `"$$"` (the bindings), or a template.
    #[schema(value_type = Object)]
    pub r#return: Option<Json>,
    /// Key bounds: `prefix`, `start` (inclusive), `after` (exclusive),
    /// `end` (exclusive). On an ordered_set they bound the work.
    pub range: Option<RangeDoc>,
    /// Most results, 1 to 10000 (default 100). `select` only.
    pub limit: Option<usize>,
    /// `next_cursor` of the previous answer.
    pub cursor: Option<String>,
    /// Walk an ordered_set from its high end. `select` only.
    pub reverse: Option<bool>,
}

/// Key bounds of a select.
#[derive(Debug, ToSchema)]
pub struct RangeDoc {
    /// Only keys starting with this.
    pub prefix: Option<String>,
    /// Lowest key, inclusive.
    pub start: Option<String>,
    /// Lowest key, exclusive.
    pub after: Option<String>,
    /// Highest key, exclusive.
    pub end: Option<String>,
}

/// What a select returned.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"results": [{"user": "user:1", "age": 34}], "next_cursor": null}))]
pub struct SelectResult {
    /// One result per matching object, as `return` builds it.
    #[schema(value_type = Vec<Object>)]
    pub results: Vec<Json>,
    /// Where to continue, or null when the select is complete.
    pub next_cursor: Option<String>,
}

/// How many objects matched.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"count": 2, "next_cursor": null}))]
pub struct CountResult {
    /// Matching objects seen by this request.
    pub count: u64,
    /// Where to continue, or null when the whole table was examined.
    pub next_cursor: Option<String>,
}

/// How many objects were deleted.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"deleted": 2, "next_cursor": null}))]
pub struct DeletedResult {
    /// Objects this request deleted.
    pub deleted: u64,
    /// Where to continue, or null when the whole table was examined.
    pub next_cursor: Option<String>,
}

/// A multi-get request.
#[derive(Debug, ToSchema)]
#[schema(example = json!({"keys": ["user:1", "user:2", "nobody"]}))]
pub struct LookupBody {
    /// 1 to 1000 keys.
    pub keys: Vec<String>,
}

/// What a multi-get found.
#[derive(Debug, ToSchema)]
#[schema(example = json!({"entries": [{"key": "user:1", "value": {"name": "Ada"}, "ttl_ms": null}], "missing": ["nobody"]}))]
pub struct LookupResult {
    /// The entries found, as `GET` returns each, in request order.
    #[schema(value_type = Vec<Object>)]
    pub entries: Vec<Json>,
    /// The keys not found, in request order.
    pub missing: Vec<String>,
}

/// The body's members, checked against what the endpoint accepts.
fn members(bytes: &[u8], allowed: &[&str]) -> ApiResult<Map<String, Json>> {
    let body: Json = parse_json(bytes)?;
    let Json::Object(map) = body else {
        return Err(ApiError::InvalidMatchSpec(
            "the body must be a JSON object".into(),
        ));
    };
    if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(ApiError::InvalidMatchSpec(format!(
            "{unknown}: not a member of this request (allowed: {})",
            allowed.join(", ")
        )));
    }
    Ok(map)
}

fn string_member(map: &Map<String, Json>, name: &str, path: &str) -> ApiResult<Option<String>> {
    match map.get(name) {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(ApiError::InvalidArgument(format!(
            "{path}{name} must be a string"
        ))),
    }
}

/// The parts every select endpoint shares: the spec, and the range and
/// cursor as a scan takes them.
struct Common {
    spec: MatchSpec,
    scan: ScanRequest,
}

fn common(map: &Map<String, Json>) -> ApiResult<Common> {
    let spec = MatchSpec::parse(map.get("match"), map.get("where"), map.get("return"))
        .map_err(|e| ApiError::InvalidMatchSpec(e.to_string()))?;
    let mut scan = match map.get("range") {
        None | Some(Json::Null) => ScanRequest::default(),
        Some(Json::Object(r)) => {
            if let Some(unknown) = r
                .keys()
                .find(|k| !["prefix", "start", "after", "end"].contains(&k.as_str()))
            {
                return Err(ApiError::InvalidArgument(format!(
                    "range.{unknown}: not a bound (prefix, start, after, end)"
                )));
            }
            let scan = ScanRequest {
                prefix: string_member(r, "prefix", "range.")?.filter(|p| !p.is_empty()),
                start: string_member(r, "start", "range.")?,
                after: string_member(r, "after", "range.")?,
                end: string_member(r, "end", "range.")?,
                ..ScanRequest::default()
            };
            if scan.start.is_some() && scan.after.is_some() {
                return Err(ApiError::InvalidArgument(
                    "range.start and range.after exclude each other".into(),
                ));
            }
            scan.check_bounds()?;
            scan
        }
        Some(_) => return Err(ApiError::InvalidArgument("range must be an object".into())),
    };
    scan.cursor = string_member(map, "cursor", "")?
        .as_deref()
        .map(Cursor::decode)
        .transpose()?;
    Ok(Common { spec, scan })
}

async fn run(
    state: &AppState,
    table: &impl TableOps,
    common: Common,
    mode: SelectMode,
    reverse: bool,
) -> ApiResult<select::Selected> {
    let walk = Walk {
        mode,
        scan: ScanRequest {
            reverse,
            ..common.scan
        },
        budget: state.limits.max_select_scan,
        max_bytes: state
            .limits
            .max_response_bytes
            .saturating_sub(select::ENVELOPE_BYTES),
        pace: super::scope::pace(),
    };
    Ok(select::select(table, &common.spec, walk).await?)
}

/// `select_count` or `select_delete`: the objects counted or deleted, and
/// where to continue.
async fn count_or_delete(
    state: &AppState,
    who: &Principal,
    table: &str,
    bytes: &[u8],
    mode: SelectMode,
) -> ApiResult<(u64, Option<String>)> {
    let op = if mode == SelectMode::Delete {
        Op::Write
    } else {
        Op::Read
    };
    let table = state.table_for(table, who, op).await?;
    let map = members(bytes, &["match", "where", "range", "cursor"])?;
    let common = common(&map)?;
    // Deletes on a sync table wait for the disk once, together, before the
    // answer, rather than once each.
    let (found, settled) = state
        .tables
        .with_one_wait(run(state, &table, common, mode, false))
        .await;
    settled?;
    let found = found?;
    Ok((found.count, found.next_cursor.map(|c| c.encode())))
}

/// Select objects.
///
/// ETS `select/3` with a JSON match specification: every live object
/// `{"key": k, "value": v}` that matches `match` and for which `where` is
/// true yields `return`. Pages like a scan: at most `limit` results and
/// `next_cursor` (null exactly when the select is complete); a page may hold
/// fewer results, even none, when the request's scan budget
/// (`--max-select-scan` objects) ran out first. On an ordered_set a `range`
/// (or a literal key in `match`) limits the work to those keys; on other
/// types it filters. Patterns match exactly (`1` is not `1.0`); guards
/// compare by one total order (null < false < true < numbers < strings <
/// arrays < objects) and a guard that fails to evaluate makes the object not
/// match. Cluster tables are read from PostgreSQL. Try it: create an
/// ordered_set `users`, `PUT /v1/tables/users/entries/user:1` with
/// `{"status":"active","age":34}`, then send the example.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/select",
    tag = "select",
    params(("table" = String, Path, description = "Table name")),
    request_body = SelectBody,
    responses(
        (status = 200, description = "One page of results", body = SelectResult),
        (status = 422, description = "result_too_large: the page's first result alone is over --max-response-bytes; error.key names it and error.next_cursor continues past it", body = ErrorBody),
        (status = 400, description = "invalid_match_spec (the message names the offending part), or a bad range, limit or cursor", body = ErrorBody),
        (status = 403, description = "Not allowed to read the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn select_objects(
    State(state): State<AppState>,
    who: Principal,
    TablePath(table): TablePath,
    RawBody(bytes): RawBody,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Read).await?;
    let map = members(
        &bytes,
        &[
            "match", "where", "return", "range", "limit", "cursor", "reverse",
        ],
    )?;
    let limit = match map.get("limit") {
        None | Some(Json::Null) => DEFAULT_SCAN_LIMIT,
        Some(n) => match n.as_u64() {
            Some(n) if (1..=MAX_SCAN_LIMIT as u64).contains(&n) => n as usize,
            _ => {
                return Err(ApiError::InvalidArgument(format!(
                    "limit must be an integer between 1 and {MAX_SCAN_LIMIT}"
                )))
            }
        },
    };
    let reverse = match map.get("reverse") {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(_) => {
            return Err(ApiError::InvalidArgument(
                "reverse must be a boolean".into(),
            ))
        }
    };
    let common = common(&map)?;
    let found = run(
        &state,
        &table,
        common,
        SelectMode::Results { limit },
        reverse,
    )
    .await?;
    // Results are JSON text already: the body is assembled, not serialized.
    let body = respond::results_body(found.results, found.next_cursor.as_ref());
    Ok(respond::json(StatusCode::OK, body))
}

/// Count matching objects.
///
/// ETS `select_count/2`: how many live objects match `match` and `where`.
/// Accepts `match`, `where`, `range` and `cursor`. A non-null `next_cursor`
/// means the request's scan budget ran out: continue with it and add up.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/select_count",
    tag = "select",
    params(("table" = String, Path, description = "Table name")),
    request_body(content = SelectBody, description = "match, where, range and cursor",
                 example = json!({"match": {"value": {"status": "active", "age": "$a"}}, "where": [">=", "$a", 18]})),
    responses(
        (status = 200, description = "The count", body = CountResult),
        (status = 400, description = "invalid_match_spec, or a bad range or cursor", body = ErrorBody),
        (status = 403, description = "Not allowed to read the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn select_count(
    State(state): State<AppState>,
    who: Principal,
    TablePath(table): TablePath,
    RawBody(bytes): RawBody,
) -> ApiResult<Response> {
    let (count, next_cursor) =
        count_or_delete(&state, &who, &table, &bytes, SelectMode::Count).await?;
    respond::serialized(StatusCode::OK, &CountResult { count, next_cursor })
}

/// Delete matching objects.
///
/// ETS `select_delete/2`: deletes every live object that matches `match`
/// and `where`, each one atomically (an object changed since it was
/// examined is not deleted) and persisted like any delete (`sync` answers
/// after the fsync). Accepts `match`, `where`, `range` and `cursor`; a
/// non-null `next_cursor` means the scan budget ran out: continue with it.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/select_delete",
    tag = "select",
    params(("table" = String, Path, description = "Table name")),
    request_body(content = SelectBody, description = "match, where, range and cursor",
                 example = json!({"match": {"value": {"status": "inactive"}}})),
    responses(
        (status = 200, description = "How many were deleted", body = DeletedResult),
        (status = 400, description = "invalid_match_spec, or a bad range or cursor", body = ErrorBody),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn select_delete(
    State(state): State<AppState>,
    who: Principal,
    TablePath(table): TablePath,
    RawBody(bytes): RawBody,
) -> ApiResult<Response> {
    let (deleted, next_cursor) =
        count_or_delete(&state, &who, &table, &bytes, SelectMode::Delete).await?;
    respond::serialized(
        StatusCode::OK,
        &DeletedResult {
            deleted,
            next_cursor,
        },
    )
}

/// Look up many keys.
///
/// Multi-get: `{"keys": [...]}` with 1 to 1000 keys. `entries` holds each
/// entry found as `GET` returns it and `missing` each key not found, both in
/// request order; a key repeated in the request appears once, where it
/// first appears. Counts hits and misses like `GET`, and never asks an
/// origin.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/lookup",
    tag = "select",
    params(("table" = String, Path, description = "Table name")),
    request_body = LookupBody,
    responses(
        (status = 200, description = "Entries found and keys missing", body = LookupResult),
        (status = 422, description = "result_too_large: the entries found are over --max-response-bytes together; ask for fewer keys", body = ErrorBody),
        (status = 400, description = "Not 1 to 1000 valid keys", body = ErrorBody),
        (status = 403, description = "Not allowed to read the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn lookup_many(
    State(state): State<AppState>,
    who: Principal,
    TablePath(table): TablePath,
    RawBody(bytes): RawBody,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Read).await?;
    let body: Json = parse_json(&bytes)?;
    let keys = match body {
        Json::Object(mut map) if map.len() == 1 => map.remove("keys"),
        _ => None,
    };
    let Some(Json::Array(keys)) = keys else {
        return Err(ApiError::InvalidArgument(
            "the body must be {\"keys\": [\"key\", ...]}".into(),
        ));
    };
    if keys.is_empty() || keys.len() > MAX_LOOKUP_KEYS {
        return Err(ApiError::InvalidArgument(format!(
            "keys must hold 1 to {MAX_LOOKUP_KEYS} keys, not {}",
            keys.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    let mut unique = Vec::with_capacity(keys.len());
    for k in keys {
        let Json::String(k) = k else {
            return Err(ApiError::InvalidArgument("keys must be strings".into()));
        };
        let k = checked_key(k)?;
        if seen.insert(k.clone()) {
            unique.push(k);
        }
    }
    let mut out = Vec::with_capacity(64 * unique.len());
    out.extend_from_slice(b"{\"entries\":[");
    let mut missing = Vec::new();
    let mut first = true;
    // The answer may not pass the page limit: a thousand keys of large
    // values would otherwise be one buffer of gigabytes.
    let limit = state
        .limits
        .max_response_bytes
        .saturating_sub(select::ENVELOPE_BYTES);
    for key in unique {
        match table.lookup(&key, ReadFrom::Nearest).await? {
            Some(entry) => {
                if !first {
                    out.push(b',');
                }
                first = false;
                out.extend_from_slice(&respond::entry_body(&key, &entry));
                if out.len() > limit {
                    return Err(ApiError::ResultTooLarge {
                        key,
                        next_cursor: None,
                        limit: state.limits.max_response_bytes,
                    });
                }
            }
            None => missing.push(key),
        }
    }
    out.extend_from_slice(b"],\"missing\":");
    let missing = serde_json::to_vec(&missing).map_err(|e| ApiError::Internal(e.to_string()))?;
    out.extend_from_slice(&missing);
    out.push(b'}');
    Ok(respond::json(StatusCode::OK, out))
}
