//! The counter endpoint: ETS `update_counter/4` over HTTP.

use super::direct::ApiRoutes;
use crate::api_routes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::{Op, Principal};
use super::extract::{EntryPath, OptionalJsonBody};
use super::respond;
use super::AppState;
use crate::api::error::{ApiResult, ErrorBody};
use crate::ops::TableOps;
use crate::store::CounterOp;

/// Routes for `/v1/tables/{table}/entries/{key}/counter`.
pub fn router() -> ApiRoutes {
    ApiRoutes::new().routes(api_routes!(update_counter))
}

/// A counter's value after an update.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"key": "page_views", "value": 42}))]
pub struct CounterResult {
    /// The key.
    pub key: String,
    /// The counter after the update.
    pub value: i64,
}

/// Update a counter.
///
/// ETS `update_counter/4`, atomic: concurrent increments never lose an
/// update. The value (or its object member `field`) must be a 64-bit integer,
/// else 409 `not_a_counter`. A missing key is 404 unless `default` is given:
/// then `default` (or `{field: default}`) is stored first and incremented.
/// With `threshold` and `set_value`, an increment that would pass the
/// threshold stores `set_value` instead, as in ETS. Overflow is 409
/// `overflow`, never a wrap. Bag tables answer 409 `wrong_table_type`. An
/// empty body means `{"incr":1}`. Keeps the entry's expiry unless the table
/// has a `default_ttl_ms`, which restarts it.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/entries/{key}/counter",
    tag = "entries",
    params(("table" = String, Path, description = "Table name"), ("key" = String, Path, description = "Key, percent-encoded")),
    request_body(content = CounterOp, description = "All fields optional",
                 example = json!({"incr": 1, "default": 0})),
    responses(
        (status = 200, description = "The counter's new value", body = CounterResult),
        (status = 400, description = "Invalid body, key or name", body = ErrorBody),
        (status = 403, description = "Not allowed to write the table", body = ErrorBody),
        (status = 404, description = "No such table, or key absent without default", body = ErrorBody),
        (status = 409, description = "not_a_counter, overflow, or wrong_table_type", body = ErrorBody),
        (status = 507, description = "Table full (a default would add a key)", body = ErrorBody),
    )
)]
pub async fn update_counter(
    State(state): State<AppState>,
    who: Principal,
    EntryPath(table, key): EntryPath,
    OptionalJsonBody(op): OptionalJsonBody<CounterOp>,
) -> ApiResult<Response> {
    let table = state.table_for(&table, &who, Op::Write).await?;
    let value = table.update_counter(&key, &op).await?;
    let mut buf = Vec::with_capacity(key.len() + 40);
    buf.extend_from_slice(b"{\"key\":");
    respond::push_str(&mut buf, &key);
    buf.extend_from_slice(b",\"value\":");
    buf.extend_from_slice(value.to_string().as_bytes());
    buf.push(b'}');
    Ok(respond::json(StatusCode::OK, buf))
}
