//! The transaction endpoint: comparisons, then several operations on one
//! table as one step, as etcd's `Txn`.
//!
//! The body is read member by member rather than through serde's derive,
//! so that every refusal names the comparison or operation at fault
//! (`then[2].ttl_ms: …`).

use super::direct::ApiRoutes;
use crate::api_routes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use serde_json::{Map, Value as Json};
use utoipa::ToSchema;

use super::auth::{Op, Principal};
use super::extract::{parse_json, RawBody, TablePath};
use super::respond;
use super::AppState;
use crate::api::error::{ApiError, ApiResult, ErrorBody};
use crate::ops::TableOps;
use crate::store::{
    check_ttl_ms, validate_key, Comparison, CounterOp, Entry, TableType, Test, Txn, TxnOp,
    TxnOutcome, TxnResult, Value, MAX_TXN_COMPARISONS, MAX_TXN_OPS,
};

/// Routes for `/v1/tables/{table}/txn`.
pub fn router() -> ApiRoutes {
    ApiRoutes::new().routes(api_routes!(transact))
}

/// A transaction, as its body says it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({
    "if": [{"key": "a", "revision": 17}, {"key": "b", "exists": false}],
    "then": [{"op": "put", "key": "b", "value": 1, "ttl_ms": 5000},
             {"op": "delete", "key": "a"},
             {"op": "counter", "key": "n", "incr": 1, "default": 0},
             {"op": "get", "key": "c"}],
    "else": [{"op": "get", "key": "a"}]
}))]
pub struct TxnBody {
    /// Comparisons, each `{"key", one of "revision" | "exists" | "value"}`;
    /// all must hold for `then` to run. At most 128.
    #[serde(rename = "if", default)]
    #[schema(max_items = 128)]
    pub compare: Vec<serde_json::Value>,
    /// Operations run when every comparison holds, in order. At most 128.
    #[serde(default)]
    #[schema(max_items = 128)]
    pub then: Vec<serde_json::Value>,
    /// Operations run otherwise. At most 128. Each of the three lists may be
    /// left out and then counts as empty.
    #[serde(rename = "else", default)]
    #[schema(max_items = 128)]
    pub otherwise: Vec<serde_json::Value>,
}

/// A transaction's answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"succeeded": true, "results": [
    {"key": "b", "value": 1, "ttl_ms": 5000, "revision": 42},
    {"deleted": true},
    {"key": "n", "value": 8, "revision": 44},
    null
]}))]
pub struct TxnAnswer {
    /// Whether every comparison held (`then` ran) or not (`else` ran).
    pub succeeded: bool,
    /// One result per operation of the branch that ran.
    pub results: Vec<serde_json::Value>,
}

/// Run a transaction.
///
/// Like etcd's `Txn`: when every comparison of `if` holds, the `then`
/// operations run, else the `else` operations, in order and as one step:
/// no single-key read, watcher or other writer sees part of it (multi-key
/// reads such as `lookup`, scans and select are not snapshots). Later
/// operations see earlier ones; one key may appear several times.
///
/// Comparisons: `{"key", "revision": n}` (the entry's ETag number; an absent
/// key fails), `{"key", "exists": bool}` (at least one object), `{"key",
/// "value": v}` (set and ordered_set tables only). Operations (`"op"`):
/// `put` and `insert_new` (`value`, optional `ttl_ms`), `delete`,
/// `delete_object` (`value`), `take`, `counter` (the counter body's members:
/// `incr`, `default`, `field`, `threshold`, `set_value`), `patch` (`value`
/// is the merge patch, an object), `get`.
///
/// Results, one per operation of the branch taken: `put`, `insert_new` and
/// `patch` the entry as `GET` returns it plus its `revision`; `get` and
/// `take` the entry with `revision`, or null when absent; `delete` and
/// `delete_object` `{"deleted": bool}`; `counter` `{"key", "value",
/// "revision"}`. Each change takes its own revision, increasing in
/// operation order, and watchers get the transaction's changes together.
///
/// An operation that would fail on its own (`not_a_counter`,
/// `not_an_object`, `overflow`, `wrong_table_type`, `memory_limit`,
/// `table_full`, `insert_new` on an existing key as `precondition_failed`,
/// `patch` or a counter without `default` on an absent key as
/// `key_not_found`) aborts the whole transaction: 409 `txn_aborted` with
/// `op` (its 0-based index in its branch) and `cause` (its own code), and
/// nothing applied. Results larger together than `--max-response-bytes`
/// are 422 `result_too_large`, also with nothing applied.
///
/// Durable as one unit: one flush on `sync` tables, one write-back batch
/// on `periodic` ones (a crash keeps all of it or none), one PostgreSQL
/// transaction on cluster tables, where the comparisons are evaluated on
/// the locked rows. `Idempotency-Key` applies. A transaction whose
/// operations are all `get` needs read access only; any other needs write
/// access.
#[utoipa::path(
    post,
    path = "/v1/tables/{table}/txn",
    tag = "entries",
    params(("table" = String, Path, description = "Table name")),
    request_body = TxnBody,
    responses(
        (status = 200, description = "The branch taken and its results", body = TxnAnswer),
        (status = 400, description = "Malformed, over the limits, an unknown op or member, or a value comparison on a bag table; the message names the index", body = ErrorBody),
        (status = 403, description = "Not allowed to write (or read) the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
        (status = 409, description = "txn_aborted: an operation failed; nothing was applied", body = ErrorBody),
        (status = 422, description = "result_too_large: the results would pass --max-response-bytes; nothing was applied", body = ErrorBody),
        (status = 503, description = "The durable tier or the cluster could not take the write; nothing was applied", body = ErrorBody),
    )
)]
pub async fn transact(
    State(state): State<AppState>,
    who: Principal,
    TablePath(table): TablePath,
    RawBody(bytes): RawBody,
) -> ApiResult<Response> {
    let body: Json = parse_json(&bytes)?;
    let mut txn = parse_txn(body)?;
    let writes = txn.then.iter().chain(&txn.otherwise).any(TxnOp::changes);
    let op = if writes { Op::Write } else { Op::Read };
    let table = state.table_for(&table, &who, op).await?;
    check_for_table(&txn, table.meta().kind())?;
    super::raw::accept_txn(table.meta().raw_values(), &mut txn)?;
    txn.max_result_bytes = state.limits.max_response_bytes.saturating_sub(64);
    let outcome = table.transact(&txn).await?;
    let ops = if outcome.succeeded {
        &txn.then
    } else {
        &txn.otherwise
    };
    Ok(respond::json(StatusCode::OK, answer(ops, &outcome)))
}

/// The transaction a body describes.
///
/// # Errors
/// 400 naming the part at fault.
fn parse_txn(body: Json) -> ApiResult<Txn> {
    let Json::Object(mut top) = body else {
        return Err(bad(
            "the body must be an object with \"if\", \"then\" and \"else\"",
        ));
    };
    let compare = list(&mut top, "if", MAX_TXN_COMPARISONS)?;
    let then = list(&mut top, "then", MAX_TXN_OPS)?;
    let otherwise = list(&mut top, "else", MAX_TXN_OPS)?;
    if let Some(name) = top.keys().next() {
        return Err(bad(format!(
            "unknown member {name:?}; a transaction has \"if\", \"then\" and \"else\""
        )));
    }
    Ok(Txn {
        compare: compare
            .into_iter()
            .enumerate()
            .map(|(i, c)| comparison(c).map_err(|e| at(&format!("if[{i}]"), e)))
            .collect::<ApiResult<_>>()?,
        then: ops(then, "then")?,
        otherwise: ops(otherwise, "else")?,
        max_result_bytes: 0,
    })
}

/// The array member `name` (empty when absent), at most `max` long.
fn list(top: &mut Map<String, Json>, name: &str, max: usize) -> ApiResult<Vec<Json>> {
    match top.remove(name) {
        None => Ok(Vec::new()),
        Some(Json::Array(items)) if items.len() <= max => Ok(items),
        Some(Json::Array(items)) => Err(bad(format!(
            "\"{name}\" holds {} items; at most {max} are allowed",
            items.len()
        ))),
        Some(_) => Err(bad(format!("\"{name}\" must be an array"))),
    }
}

fn ops(items: Vec<Json>, branch: &str) -> ApiResult<Vec<TxnOp>> {
    items
        .into_iter()
        .enumerate()
        .map(|(i, op)| operation(op).map_err(|e| at(&format!("{branch}[{i}]"), e)))
        .collect()
}

/// Prefixes an error's message with where it was found.
fn at(place: &str, e: ApiError) -> ApiError {
    match e {
        ApiError::InvalidKey(m) => ApiError::InvalidKey(format!("{place}: {m}")),
        other => ApiError::InvalidArgument(format!("{place}: {}", other.message())),
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError::InvalidArgument(message.into())
}

/// The `key` member: a valid key.
fn key_of(obj: &mut Map<String, Json>) -> ApiResult<String> {
    match obj.remove("key") {
        Some(Json::String(k)) => {
            validate_key(&k).map_err(|e| ApiError::InvalidKey(format!("key: {e}")))?;
            Ok(k)
        }
        Some(_) => Err(bad("\"key\" must be a string")),
        None => Err(bad("\"key\" is missing")),
    }
}

/// Refuses members left over once the known ones were taken.
fn no_more(obj: &Map<String, Json>, what: &str) -> ApiResult<()> {
    match obj.keys().next() {
        Some(name) => Err(bad(format!("unknown member {name:?} for {what}"))),
        None => Ok(()),
    }
}

fn comparison(c: Json) -> ApiResult<Comparison> {
    let Json::Object(mut obj) = c else {
        return Err(bad("a comparison must be an object"));
    };
    let key = key_of(&mut obj)?;
    let tests: Vec<(String, Json)> = std::mem::take(&mut obj).into_iter().collect();
    let [(name, v)] = <[(String, Json); 1]>::try_from(tests).map_err(|_| {
        bad("a comparison has \"key\" and exactly one of \"revision\", \"exists\", \"value\"")
    })?;
    let test = match (name.as_str(), v) {
        ("revision", v) => Test::Revision(
            v.as_u64()
                .ok_or_else(|| bad("\"revision\" must be a non-negative integer"))?,
        ),
        ("exists", Json::Bool(b)) => Test::Exists(b),
        ("exists", _) => return Err(bad("\"exists\" must be true or false")),
        ("value", v) => Test::Value(Value::from_json(&v)),
        (other, _) => {
            return Err(bad(format!(
                "unknown member {other:?}; a comparison tests \"revision\", \"exists\" or \"value\""
            )))
        }
    };
    Ok(Comparison { key, test })
}

fn operation(op: Json) -> ApiResult<TxnOp> {
    let Json::Object(mut obj) = op else {
        return Err(bad("an operation must be an object"));
    };
    let name = match obj.remove("op") {
        Some(Json::String(name)) => name,
        Some(_) => return Err(bad("\"op\" must be a string")),
        None => return Err(bad("\"op\" is missing")),
    };
    let key = key_of(&mut obj)?;
    let value = |obj: &mut Map<String, Json>| {
        obj.remove("value")
            .ok_or_else(|| bad(format!("\"{name}\" needs \"value\"")))
    };
    let ttl = |obj: &mut Map<String, Json>| -> ApiResult<Option<u64>> {
        match obj.remove("ttl_ms") {
            None | Some(Json::Null) => Ok(None),
            Some(v) => {
                let ttl = v
                    .as_u64()
                    .ok_or_else(|| bad("\"ttl_ms\" must be a positive integer"))?;
                check_ttl_ms(ttl).map_err(|e| bad(format!("ttl_ms: {e}")))?;
                Ok(Some(ttl))
            }
        }
    };
    let op = match name.as_str() {
        "put" | "insert_new" => {
            let v = Value::from_json(&value(&mut obj)?);
            let ttl_ms = ttl(&mut obj)?;
            if name == "put" {
                TxnOp::Put {
                    key,
                    value: v,
                    ttl_ms,
                }
            } else {
                TxnOp::InsertNew {
                    key,
                    value: v,
                    ttl_ms,
                }
            }
        }
        "delete" => TxnOp::Delete { key },
        "delete_object" => TxnOp::DeleteObject {
            key,
            value: Value::from_json(&value(&mut obj)?),
        },
        "take" => TxnOp::Take { key },
        "get" => TxnOp::Get { key },
        "patch" => {
            let patch = value(&mut obj)?;
            if !patch.is_object() {
                return Err(bad("a merge patch (\"value\") must be a JSON object"));
            }
            TxnOp::Patch { key, patch }
        }
        "counter" => {
            let body = std::mem::take(&mut obj);
            let op: CounterOp = serde_json::from_value(Json::Object(body))
                .map_err(|e| bad(format!("counter: {e}")))?;
            op.validate().map_err(|e| bad(format!("counter: {e}")))?;
            TxnOp::Counter { key, op }
        }
        other => {
            return Err(bad(format!(
                "unknown op {other:?}; ops are put, insert_new, delete, delete_object, take, counter, patch, get"
            )))
        }
    };
    no_more(&obj, &format!("\"{name}\""))?;
    Ok(op)
}

/// Rules that depend on the table: value comparisons need a set type.
fn check_for_table(txn: &Txn, kind: TableType) -> ApiResult<()> {
    if kind.is_single() {
        return Ok(());
    }
    match txn
        .compare
        .iter()
        .position(|c| matches!(c.test, Test::Value(_)))
    {
        Some(i) => Err(bad(format!(
            "if[{i}]: a value comparison needs a set or ordered_set table"
        ))),
        None => Ok(()),
    }
}

/// `{"succeeded": …, "results": […]}`.
fn answer(ops: &[TxnOp], outcome: &TxnOutcome) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + 64 * outcome.results.len());
    out.extend_from_slice(if outcome.succeeded {
        b"{\"succeeded\":true,\"results\":["
    } else {
        b"{\"succeeded\":false,\"results\":["
    });
    for (i, (op, result)) in ops.iter().zip(&outcome.results).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let key = op.key();
        match result {
            TxnResult::Written(entry) | TxnResult::Found(entry) => push_entry(&mut out, key, entry),
            TxnResult::Deleted(d) => out.extend_from_slice(if *d {
                b"{\"deleted\":true}"
            } else {
                b"{\"deleted\":false}"
            }),
            TxnResult::Counter { value, revision } => {
                out.extend_from_slice(b"{\"key\":");
                respond::push_str(&mut out, key);
                out.extend_from_slice(
                    format!(",\"value\":{value},\"revision\":{revision}}}").as_bytes(),
                );
            }
        }
    }
    out.extend_from_slice(b"]}");
    out
}

/// An entry as `GET` answers it, with its `revision`; `null` when absent.
fn push_entry(out: &mut Vec<u8>, key: &str, entry: &Option<Entry>) {
    let Some(entry) = entry else {
        out.extend_from_slice(b"null");
        return;
    };
    let mut body = respond::entry_body(key, entry);
    body.pop();
    out.extend_from_slice(&body);
    out.extend_from_slice(format!(",\"revision\":{}}}", entry.version).as_bytes());
}
