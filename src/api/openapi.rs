//! The OpenAPI document's frame; paths come from the handlers' annotations
//! as the routers are built, so the spec cannot drift from the routes.

use utoipa::OpenApi;

use crate::error::ErrorBody;

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
conditional. Versions increase with every write of any key.",
        license(name = "Apache-2.0"),
    ),
    tags(
        (name = "tables", description = "Create, inspect, change and drop tables (ets:new, ets:info, ets:delete/1)"),
        (name = "entries", description = "Objects under keys: insert, lookup, delete, take, counters, merge patch, scans"),
        (name = "service", description = "Health and readiness"),
    ),
    components(schemas(ErrorBody))
)]
pub struct ApiDoc;
