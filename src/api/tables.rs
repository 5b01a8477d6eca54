//! Table endpoints: create, list, inspect, change settings, drop, sync.

use super::direct::ApiRoutes;
use crate::api_routes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::auth::{authorize, Op, Principal};
use super::extract::{from_object, JsonBody, JsonObject, TablePath};
use super::respond;
use super::AppState;
use crate::api::error::{ApiError, ApiResult, ErrorBody};
use crate::clock::rfc3339_ms;
use crate::ops::TableOps;
use crate::store::{
    check_auto_save_ms, check_max_entries, check_ttl_ms, Eviction, Persistence, TableSettings,
    TableSpec,
};

/// Routes for `/v1/tables…`.
pub fn router() -> ApiRoutes {
    ApiRoutes::new()
        .routes(api_routes!(create_table, list_tables))
        .routes(api_routes!(get_table, patch_table, delete_table))
        .routes(api_routes!(sync_table))
        .routes(api_routes!(give_away))
}

/// Body of `POST /v1/tables/{table}/give_away`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"to": "bob"}))]
pub struct GiveAway {
    /// The principal that will own the table.
    pub to: String,
}

// The handler reads `name`, refuses members that are not settings, and
// reads the rest as `TableSettings` (serde cannot refuse unknown members
// through a flattened field).
/// Body of `POST /v1/tables`: a name and any of the table settings; only
/// `name` is required, and unknown members are refused with 400.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"name": "users", "type": "set", "access": "protected", "persistence": "none"}))]
pub struct CreateTable {
    /// 1–64 characters of `A-Z a-z 0-9 _ - .`.
    pub name: String,
    /// The settings; each has a default.
    #[serde(flatten)]
    pub settings: TableSettings,
}

/// The table a create body describes, owned by `who`: the name checked,
/// unknown members refused, origins allowed only to admins and only where
/// `--origin-allow` lets them.
///
/// # Errors
/// [`ApiError::InvalidName`], [`ApiError::InvalidArgument`],
/// [`ApiError::Forbidden`].
pub fn spec_from_body(
    state: &AppState,
    who: &Principal,
    mut body: serde_json::Map<String, serde_json::Value>,
) -> ApiResult<TableSpec> {
    let name = match body.remove("name") {
        Some(serde_json::Value::String(name)) => name,
        Some(_) => return Err(ApiError::InvalidArgument("name must be a string".into())),
        None => return Err(ApiError::InvalidArgument("missing field `name`".into())),
    };
    crate::store::validate_table_name(&name).map_err(|e| ApiError::InvalidName(e.to_string()))?;
    let known = TableSettings::member_names();
    if let Some(unknown) = body.keys().find(|k| !known.contains(k)) {
        return Err(ApiError::InvalidArgument(format!(
            "unknown field `{unknown}`, expected `name` or one of {}",
            known
                .iter()
                .map(|k| format!("`{k}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let settings: TableSettings = from_object(body)?;
    if let Some(origin) = &settings.origin {
        if !who.admin {
            return Err(ApiError::Forbidden(
                "only admins create tables with an origin".into(),
            ));
        }
        state.origins.check(origin)?;
    }
    Ok(TableSpec {
        name,
        settings,
        owner: who.name.to_string(),
        created_at: state.tables.store().now_ms(),
    })
}

/// Body of `PATCH /v1/tables/{table}`: the settings to change; absent ones stay.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"default_ttl_ms": 60000, "max_entries": null}))]
pub struct PatchTable {
    /// `periodic` tables only.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    pub auto_save_ms: Option<Option<u64>>,
    /// null removes the default TTL.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    pub default_ttl_ms: Option<Option<u64>>,
    /// null removes the limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>)]
    pub max_entries: Option<Option<u64>>,
    /// New eviction policy.
    #[serde(default)]
    pub eviction: Option<Eviction>,
}

/// Tells a field sent as null (`Some(None)`) from one not sent (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Per-table counters.
#[derive(Debug, Serialize, ToSchema)]
pub struct StatsInfo {
    /// Lookups that found a live entry.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Objects inserted.
    pub inserts: u64,
    /// Objects removed by delete, delete_object, take or clear.
    pub deletes: u64,
    /// Keys removed because their TTL passed.
    pub expired: u64,
    /// Keys evicted to respect `max_entries`.
    pub evicted: u64,
    /// Requests made to the origin.
    pub origin_fetches: u64,
    /// Origin requests that failed or timed out.
    pub origin_errors: u64,
}

/// A table's settings and state (ETS `info/1`).
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "name": "users", "type": "set", "access": "protected", "persistence": "periodic",
    "auto_save_ms": 1000, "default_ttl_ms": null, "max_entries": null, "eviction": "none",
    "origin": null, "size": 2, "memory_bytes": 684, "owner": "alice",
    "created_at": "2026-11-21T22:37:05.540Z",
    "stats": {"hits": 10, "misses": 1, "inserts": 2, "deletes": 0, "expired": 0,
              "evicted": 0, "origin_fetches": 0, "origin_errors": 0},
    "dirty": 0, "last_saved_at": "2026-11-21T22:37:06.041Z"
}))]
pub struct TableInfo {
    /// Table name.
    pub name: String,
    /// Its settings, as they are now.
    #[serde(flatten)]
    pub settings: TableSettings,
    /// Objects stored.
    pub size: u64,
    /// Estimated bytes held by the table's objects.
    pub memory_bytes: u64,
    /// Owning principal.
    pub owner: String,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// Counters.
    pub stats: StatsInfo,
    /// Persistent tables only: objects not yet on disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dirty: Option<u64>,
    /// Persistent tables only: when dirty data was last written, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub last_saved_at: Option<Option<String>>,
}

/// All tables the caller may read.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"tables": [{"name": "users", "type": "set", "access": "protected",
    "persistence": "none", "auto_save_ms": null, "default_ttl_ms": null, "max_entries": null,
    "eviction": "none", "origin": null, "size": 0, "memory_bytes": 0, "owner": "alice",
    "created_at": "2026-11-21T22:37:05.540Z",
    "stats": {"hits": 0, "misses": 0, "inserts": 0, "deletes": 0, "expired": 0,
              "evicted": 0, "origin_fetches": 0, "origin_errors": 0}}]}))]
pub struct TableList {
    /// Tables by name.
    pub tables: Vec<TableInfo>,
}

/// Builds a table's info: settings and node-local counters from the
/// table itself, size and the other statistics from its tier (table-wide
/// for cluster tables).
///
/// # Errors
/// [`ApiError::Unavailable`] when a cluster table's statistics cannot be
/// read.
pub async fn table_info(table: &impl TableOps) -> Result<TableInfo, ApiError> {
    use std::sync::atomic::Ordering::Relaxed;
    let counts = table.counts().await?;
    let meta = table.meta();
    let spec = meta.spec();
    let s = &meta.stats;
    Ok(TableInfo {
        name: spec.name,
        settings: spec.settings,
        size: counts.size,
        memory_bytes: table.memory_bytes(),
        owner: spec.owner,
        created_at: rfc3339_ms(spec.created_at),
        stats: StatsInfo {
            hits: s.hits.load(Relaxed),
            misses: s.misses.load(Relaxed),
            inserts: counts.inserts,
            deletes: counts.deletes,
            expired: counts.expired,
            evicted: counts.evicted,
            origin_fetches: s.origin_fetches.load(Relaxed),
            origin_errors: s.origin_errors.load(Relaxed),
        },
        dirty: meta.dirty().map(|_| meta.dirty_count()),
        last_saved_at: meta.dirty().map(|d| match d.last_saved_at.load(Relaxed) {
            0 => None,
            ms => Some(rfc3339_ms(ms)),
        }),
    })
}

pub(crate) async fn info_response(
    status: StatusCode,
    table: &impl TableOps,
) -> ApiResult<Response> {
    respond::serialized(status, &table_info(table).await?)
}

/// Create a table.
///
/// ETS `ets:new/2`, DETS `open_file/2`. The creating principal owns the
/// table. Only `name` is required; see the schema for defaults. A second
/// create with the same name is 409, whatever its settings. `persistence`:
/// `none` keeps the table in memory only (gone on restart, like ETS);
/// `periodic` writes changes to disk at most `auto_save_ms` after they are
/// acknowledged, so a crash loses at most that much (like DETS `auto_save`,
/// but the bound holds under constant load); `sync` acknowledges a write only
/// once it is on disk, sharing each fsync among concurrent writers;
/// `cluster` (only when the server runs with `--cluster-url`, else 400)
/// keeps the table in PostgreSQL, the same table on every node started with
/// that URL: a write is acknowledged once committed there, a plain read may
/// lag another node's write by the staleness bound (`?consistent=true`
/// reads PostgreSQL), and names are one namespace with local tables (409
/// either way). A graceful stop writes everything. A persistent table becomes visible to every
/// request only once its definition is on disk, and the 201 follows; creates
/// and drops of one name take effect one at a time, in the order they
/// happen. `--max-tables` is exact under concurrent creates.
#[utoipa::path(
    post,
    path = "/v1/tables",
    tag = "tables",
    request_body = CreateTable,
    responses(
        (status = 201, description = "Created", body = TableInfo),
        (status = 400, description = "Invalid name or settings", body = ErrorBody),
        (status = 403, description = "Only admins create tables with an origin", body = ErrorBody),
        (status = 409, description = "A table of that name exists", body = ErrorBody),
        (status = 507, description = "The server holds --max-tables tables", body = ErrorBody),
    )
)]
pub async fn create_table(
    State(state): State<AppState>,
    who: Principal,
    JsonBody(body): JsonBody<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult<Response> {
    let spec = spec_from_body(&state, &who, body)?;
    let table = state.tables.create(spec).await?;
    info_response(StatusCode::CREATED, &table).await
}

/// List tables.
///
/// ETS `all/0`: every table the caller may read, by name, with its info.
#[utoipa::path(
    get,
    path = "/v1/tables",
    tag = "tables",
    responses((status = 200, description = "Tables", body = TableList))
)]
pub async fn list_tables(State(state): State<AppState>, who: Principal) -> ApiResult<Response> {
    let mut tables = Vec::new();
    for t in state.tables.all() {
        if authorize(t.meta(), &who, Op::Read).is_ok() {
            tables.push(table_info(&t).await?);
        }
    }
    respond::serialized(StatusCode::OK, &TableList { tables })
}

/// Describe a table.
///
/// ETS `info/1`: settings, size, estimated memory, owner and counters.
#[utoipa::path(
    get,
    path = "/v1/tables/{table}",
    tag = "tables",
    params(("table" = String, Path, description = "Table name")),
    responses(
        (status = 200, description = "Table info", body = TableInfo),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 403, description = "Not allowed to read the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn get_table(
    State(state): State<AppState>,
    who: Principal,
    TablePath(name): TablePath,
) -> ApiResult<Response> {
    let table = state.table_for(&name, &who, Op::Read).await?;
    info_response(StatusCode::OK, &table).await
}

/// Change table settings.
///
/// Settable: `auto_save_ms` (periodic tables), `default_ttl_ms`,
/// `max_entries`, `eviction`; null clears `default_ttl_ms` or `max_entries`.
/// Every field is checked before any is applied. A new TTL applies to later
/// writes. Lowering `max_entries` below the current size refuses growth (or,
/// with `lru`, evicts) from the next write on. Owner or admin only.
#[utoipa::path(
    patch,
    path = "/v1/tables/{table}",
    tag = "tables",
    params(("table" = String, Path, description = "Table name")),
    request_body = PatchTable,
    responses(
        (status = 200, description = "Updated info", body = TableInfo),
        (status = 400, description = "Invalid or unknown setting", body = ErrorBody),
        (status = 403, description = "Not the owner", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn patch_table(
    State(state): State<AppState>,
    who: Principal,
    TablePath(name): TablePath,
    JsonObject(patch): JsonObject<PatchTable>,
) -> ApiResult<Response> {
    let table = state.table_for(&name, &who, Op::Manage).await?;
    match patch.auto_save_ms {
        Some(_) if table.meta().persistence() != Persistence::Periodic => {
            return Err(ApiError::InvalidArgument(
                "auto_save_ms applies to persistence \"periodic\" only".into(),
            ))
        }
        Some(None) => {
            return Err(ApiError::InvalidArgument(
                "auto_save_ms cannot be null".into(),
            ))
        }
        Some(Some(ms)) => check_auto_save_ms(ms)?,
        None => {}
    }
    if let Some(Some(ttl)) = patch.default_ttl_ms {
        check_ttl_ms(ttl)?;
    }
    if let Some(Some(max)) = patch.max_entries {
        check_max_entries(max)?;
    }
    state
        .tables
        .redefine(&table, move |t| {
            if let Some(Some(ms)) = patch.auto_save_ms {
                t.set_auto_save_ms(ms);
            }
            if let Some(ttl) = patch.default_ttl_ms {
                t.set_default_ttl_ms(ttl);
            }
            if let Some(max) = patch.max_entries {
                t.set_max_entries(max);
            }
            if let Some(eviction) = patch.eviction {
                t.set_eviction(eviction);
            }
        })
        .await?;
    info_response(StatusCode::OK, &table).await
}

/// Drop a table.
///
/// ETS `delete/1`: the table and all its objects (and, for persistent
/// tables, its data on disk) are gone. Owner or admin only. The 204 comes
/// once the data is gone from disk; a create of the same name waits for
/// that, so it never sees the old table's data.
#[utoipa::path(
    delete,
    path = "/v1/tables/{table}",
    tag = "tables",
    params(("table" = String, Path, description = "Table name")),
    responses(
        (status = 204, description = "Dropped"),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 403, description = "Not the owner", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn delete_table(
    State(state): State<AppState>,
    who: Principal,
    TablePath(name): TablePath,
) -> ApiResult<Response> {
    let table = state.table_for(&name, &who, Op::Manage).await?;
    state.tables.drop_table(&table).await?;
    state.origins.forget_table(&name);
    Ok(respond::empty(StatusCode::NO_CONTENT))
}

/// Flush a table to disk.
///
/// DETS `sync/1`: answers once everything acknowledged so far is on disk.
/// For tables with persistence `none` there is nothing to write and it
/// answers at once. Returns the table's info.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/sync",
    tag = "tables",
    params(("table" = String, Path, description = "Table name")),
    responses(
        (status = 200, description = "Everything acknowledged is on disk", body = TableInfo),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
        (status = 503, description = "The durable tier cannot take writes now", body = ErrorBody),
    )
)]
pub async fn sync_table(
    State(state): State<AppState>,
    who: Principal,
    TablePath(name): TablePath,
) -> ApiResult<Response> {
    let table = state.table_for(&name, &who, Op::Write).await?;
    table.sync().await?;
    info_response(StatusCode::OK, &table).await
}

/// Hand a table to another principal.
///
/// ETS `give_away/3`: the table's owner becomes `to`, which then has the
/// owner's rights (and the previous owner loses them). Owner or admin only;
/// `to` must be a configured principal when authentication is on.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/give_away",
    tag = "tables",
    params(("table" = String, Path, description = "Table name")),
    request_body = GiveAway,
    responses(
        (status = 200, description = "The table with its new owner", body = TableInfo),
        (status = 400, description = "Unknown principal or bad body", body = ErrorBody),
        (status = 403, description = "Not the owner", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn give_away(
    State(state): State<AppState>,
    who: Principal,
    TablePath(name): TablePath,
    JsonObject(body): JsonObject<GiveAway>,
) -> ApiResult<Response> {
    let table = state.table_for(&name, &who, Op::Manage).await?;
    // Under mutual TLS any valid name can be a client certificate's.
    let mutual = state.tls.as_ref().is_some_and(|t| t.mutual());
    let known = if mutual {
        crate::api::tokens::is_principal_name(&body.to)
    } else if state.tokens.enabled() {
        state.tokens.snapshot().knows(&body.to)
    } else {
        body.to == crate::api::auth::ANONYMOUS
    };
    if !known {
        return Err(ApiError::InvalidArgument(format!(
            "'{}' is not a principal of this server",
            body.to
        )));
    }
    state
        .tables
        .redefine(&table, move |t| t.set_owner(&body.to))
        .await?;
    info_response(StatusCode::OK, &table).await
}
