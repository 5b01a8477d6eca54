//! The OpenAPI document's frame; paths come from the handlers' annotations
//! as the routers are built, so the spec cannot drift from the routes.

use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::{Ref, ResponseBuilder};
use utoipa::{Modify, OpenApi};

use crate::api::error::ErrorBody;

/// Title, description and tags of the published spec.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "larder",
        description = "Erlang ETS/DETS-style tables over HTTP/JSON.\n\n\
Tables are `set`, `ordered_set`, `bag` or `duplicate_bag` with the exact ETS semantics of each \
operation (the ETS analogue is named on every operation). Keys are UTF-8 strings of 1-1024 bytes \
without NUL, percent-encoded in the path; values are any JSON. Request bodies are parsed as JSON \
whatever their Content-Type. URL rules remove the path segments `.` and `..` (even percent-encoded) before a request is sent, so those two keys are reachable only through bulk insert and scans. Every error is `{\"error\":{\"code\":\"…\",\"message\":\"…\"}}`.\n\n\
Values are stored as canonical JSON: object members sorted by name, no insignificant whitespace. \
Two values are identical (for `bag` and `delete_object`) when their canonical texts are equal. \
Numbers outside the 64-bit integer range are kept as IEEE doubles, as JavaScript would.\n\n\
ETags are entry versions, unique across the server; `If-Match` and `If-None-Match` make writes \
conditional. Versions increase with every write of any key, a rolled-back bulk insert included.\n\n\
Connections stay usable after most early answers: a request answered by a handler before its \
body was read (403, 404, 405, 503) has the rest of its body read and discarded, up to the body \
limit; past that, or for a body that arrives too slowly, the answer carries `Connection: close`. \
A request refused before any of its body was read (401, a declared `Content-Length` over the \
limit: 413, before any `100 Continue`) closes the connection instead. Every answer carries \
`x-request-id`: the client's own, when it sent one.\n\n\
Bounds: no client can exhaust the server's memory, descriptors or workers. Connections are capped \
(`--max-connections`; at the cap the one waiting longest for a request head, else the longest idle, \
is closed to make room); a request head must arrive within `--header-timeout-ms` (10 s) and be at \
most 64 KiB (431 `headers_too_large`); idle keep-alive connections close after \
`--idle-timeout-ms` (60 s). `--request-timeout-ms` is each request's deadline: a body not in by \
then gets 408 `request_timeout` (nothing applied); a read not answered by then 503; a write \
whose body is in is never abandoned. Scans, selects, exports and imports are long work: at most \
`--max-long-requests` run at once (others wait until their deadline, then 503), they give their \
worker thread back every few milliseconds, and scans and selects stop before the deadline with \
what they found and a cursor. A select or scan page is at most `--max-response-bytes` (8 MiB) of \
JSON: the result that would cross it starts the next page, and a single result over it is 422 \
`result_too_large`, naming its key, with a `next_cursor` past it (a multi-get over it is 422 \
too). `delete_all_objects` is one step whatever the table holds. Watch history, idempotency \
records and response bodies in flight count toward `--max-memory-bytes` with the tables. A watch \
stream whose principal loses read access gets `event: revoked` and ends. Bodies whose objects \
repeat a member name are 400 `invalid_json`. Imports are bound by `--max-import-bytes` and \
`--max-body-bytes` per line, not by the deadline.\n\n\
Idempotent retries: every write and manage operation (decided by route and method: PUT, PATCH, \
DELETE and POST, except `select`, `select_count` and `lookup`, which change nothing, and imports, \
whose streams are not buffered) may carry `Idempotency-Key: <1-128 printable ASCII>`. The first \
request with a key is applied and its 2xx answer remembered for `--idempotency-ttl-secs` (default \
one day), per principal and table; a retry with the same key, method, path and body gets that \
answer (status, body, `ETag`) with `Idempotent-Replayed: true` and applies nothing. The same key \
with a different request is 422 `idempotency_key_reused`; a retry while the first is still running \
is 409 `idempotency_in_flight`; a malformed key is 400 `invalid_argument`. On `sync` tables the \
record is on disk before the answer is sent, in the same batch as its change; on cluster tables the \
key is claimed in the change's own PostgreSQL transaction and the answer committed with it, so the \
same key sent to two nodes at once applies once and a retry sent to another node is answered from \
the record.\n\n\
Tokens: `Authorization: Bearer <token>`. The tokens file holds `principal:secret[:read]` lines, \
the secret being the token or `sha256:<64 hex>` (its SHA-256); a principal may have several \
tokens. A `read` token may use reads only (GET and HEAD of entries and tables, scans, `lookup`, \
`select`, `select_count`, `watch`, `export`): anything else is 403. `SIGHUP` reloads the file: \
removed tokens get 401 and their watch streams `event: revoked`; a file that fails to parse is \
refused and the tokens in force stay. Over HTTPS with `--tls-client-ca` (mutual TLS), a request \
without a bearer token is made by the principal named in the client certificate's subject common \
name (1-64 of `A-Z a-z 0-9 _ - .`, else 401); a valid bearer token wins over the certificate, an \
invalid one is 401.\n\n\
Rate limits: with `--rate-limit N[/burst]` (or `rate=N/burst` on a principal's token lines) each \
principal may make N requests per second on average, in bursts of up to `burst`; `anonymous` \
callers are limited per client address. Past it: 429 `rate_limited` with `Retry-After`. Every \
answer on a `/v1` route of a limited caller carries `RateLimit-Limit` (the burst), \
`RateLimit-Remaining` and `RateLimit-Reset` (seconds until the bucket is full). `/healthz`, \
`/readyz` and `/metrics` are not limited; a 401 and a request shed with 503 cost nothing.",
        license(name = "Apache-2.0"),
    ),
    tags(
        (name = "tables", description = "Create, inspect, change and drop tables (ets:new, ets:info, ets:delete/1)"),
        (name = "entries", description = "Objects under keys: insert, lookup, delete, take, counters, merge patch, scans"),
        (name = "transfer", description = "Export a table as NDJSON with a checksum, and import it (ets:tab2file, ets:file2tab)"),
        (name = "watch", description = "Server-Sent Events of a table's changes, resumable from a revision"),
        (name = "select", description = "ETS select, select_count and select_delete with JSON match specifications, and multi-get"),
        (name = "service", description = "Health and readiness"),
    ),
    components(schemas(ErrorBody))
)]
pub struct ApiDoc;

/// The frame plus the routes' paths, with [`CommonResponses`] applied.
/// Run after the routers are merged: the paths only exist from then on.
pub(crate) fn finish(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    CommonResponses.modify(&mut doc);
    doc
}

/// Adds what every operation shares, so handlers document only their own
/// outcomes: path parameter constraints, and the error statuses any request
/// may meet (400 for a malformed name or key, 401 when authentication is
/// on, 413 for bodies over the limit, 503 while starting, stopping or
/// shedding load).
pub(crate) struct CommonResponses;

impl Modify for CommonResponses {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
                &mut item.head,
            ];
            for (op, is_head) in operations
                .into_iter()
                .zip([false, false, false, false, false, true])
            {
                if let Some(op) = op.as_mut() {
                    common(path, op, is_head);
                }
            }
        }
    }
}

/// A typical error body for a status, shown as the response's example.
fn error_example(code: &str) -> Option<serde_json::Value> {
    let (code, message) = match code {
        "400" => ("invalid_argument", "limit must be between 1 and 10000"),
        "401" => ("unauthorized", "a valid bearer token is required"),
        "403" => (
            "forbidden",
            "principal 'bob' may not write to table 'users' (Protected access, owned by 'alice')",
        ),
        "404" => ("key_not_found", "key not found"),
        "409" => ("not_a_counter", "the stored value is not a 64-bit integer"),
        "412" => ("precondition_failed", "the entry changed or is absent"),
        "408" => (
            "request_timeout",
            "the request body did not arrive in time; nothing was applied",
        ),
        "413" => ("payload_too_large", "request body exceeds 1048576 bytes"),
        "422" => (
            "result_too_large",
            "the answer would pass the 8388608-byte limit (--max-response-bytes) at key \"big\"; continue after it with next_cursor",
        ),
        "429" => (
            "rate_limited",
            "past the rate limit (bursts of 20); retry in 1 s",
        ),
        "502" => ("origin_error", "origin failed: origin answered 500"),
        "503" => ("unavailable", "too many requests in flight; retry shortly"),
        "504" => ("origin_timeout", "origin did not answer in time"),
        "507" => (
            "table_full",
            "table is full (1000 entries) and does not evict",
        ),
        _ => return None,
    };
    Some(serde_json::json!({"error": {"code": code, "message": message}}))
}

fn error_response(description: &str, with_body: bool) -> utoipa::openapi::Response {
    let builder = ResponseBuilder::new().description(description);
    if with_body {
        builder
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build()
    } else {
        builder.build()
    }
}

fn common(path: &str, op: &mut Operation, is_head: bool) {
    let service = !path.starts_with("/v1/");
    for param in op.parameters.iter_mut().flatten() {
        if param.parameter_in != ParameterIn::Path {
            continue;
        }
        let schema = match param.name.as_str() {
            "table" => ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(r"^[A-Za-z0-9_.\-]{1,64}$"))
                .min_length(Some(1))
                .max_length(Some(64))
                .build(),
            "key" => ObjectBuilder::new()
                .schema_type(Type::String)
                .description(Some("1 to 1024 bytes of UTF-8 without NUL"))
                .min_length(Some(1))
                .max_length(Some(1024))
                .build(),
            _ => continue,
        };
        param.schema = Some(schema.into());
    }
    let responses = &mut op.responses.responses;
    let mut add = |code: &str, description: &str| {
        responses
            .entry(code.to_owned())
            .or_insert_with(|| error_response(description, !is_head).into());
    };
    if !service {
        add("400", "Malformed table name, key, parameter or body");
        add(
            "401",
            "Authentication is on and the bearer token is missing or unknown",
        );
        add(
            "403",
            "The principal may not do this to this table, or its token is read-only and the route is not a read",
        );
        add(
            "429",
            "Past the caller's rate limit (--rate-limit, or rate= in the tokens file); see Retry-After",
        );
        add(
            "503",
            "Starting, stopping, or shedding load (see Retry-After)",
        );
        if op.request_body.is_some() {
            add("413", "Body larger than --max-body-bytes");
            add(
                "408",
                "The body did not arrive before the request deadline (--request-timeout-ms); nothing was applied",
            );
        }
    } else if path == "/metrics" {
        add(
            "401",
            "Authentication is on and the bearer token is missing or unknown",
        );
        add("503", "Shedding load (see Retry-After)");
    }
    for (code, response) in op.responses.responses.iter_mut() {
        if let utoipa::openapi::RefOr::T(response) = response {
            for content in response.content.values_mut() {
                if let Some(example) = error_example(code) {
                    content.example = Some(example);
                }
            }
        }
    }
}
