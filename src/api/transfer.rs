//! Export and import of a table as NDJSON (`ets:tab2file`/`file2tab` with
//! a checksum): a first line with the table's create body, one line per
//! object with its absolute expiry deadline, and a trailer with the count
//! and the SHA-256 of the object lines. Export streams page by page, so
//! memory stays bounded whatever the table's size; import verifies the
//! whole stream before it creates anything.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{Op, Principal};
use super::extract::{checked_key, QueryParams, TablePath};
use super::tables::{info_response, spec_from_body};
use super::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::ops::{ReadFrom, TableOps};
use crate::store::{Cursor, Expiry, ScanRequest, Value};

/// Routes for export and import.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(export_table))
        .routes(routes!(import_table))
}

/// Objects per page of an export.
const PAGE: usize = 1000;

/// The media type of exports and imports.
const NDJSON: &str = "application/x-ndjson";

/// Where an export is.
enum Phase {
    Header(Vec<u8>),
    Objects(Option<Cursor>),
    Trailer,
    Done,
}

/// An export in progress: what the stream needs between pages.
struct Export {
    state: AppState,
    who: Principal,
    table: String,
    phase: Phase,
    hasher: Sha256,
    count: u64,
}

/// The create body of a table, as an export's first line.
fn header_line(table: &impl TableOps) -> ApiResult<Vec<u8>> {
    let spec = table.meta().spec();
    let settings =
        serde_json::to_vec(&spec.settings).map_err(|e| ApiError::Internal(e.to_string()))?;
    // `name` first, then the settings' members: `{"name":…,` + `"type":…}`.
    let Some(members) = settings.strip_prefix(b"{").filter(|m| m.len() > 1) else {
        return Err(ApiError::Internal("settings are not an object".into()));
    };
    let mut line = b"{\"name\":".to_vec();
    serde_json::to_writer(&mut line, &spec.name).map_err(|e| ApiError::Internal(e.to_string()))?;
    line.push(b',');
    line.extend_from_slice(members);
    line.push(b'\n');
    Ok(line)
}

impl Export {
    /// The next chunk of the stream, or `None` at its end. An error ends
    /// the stream without a trailer, so an importer can tell.
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Export)> {
        match std::mem::replace(&mut self.phase, Phase::Done) {
            Phase::Header(line) => {
                self.phase = Phase::Objects(None);
                Some((Ok(Bytes::from(line)), self))
            }
            Phase::Objects(cursor) => match self.page(cursor).await {
                Ok((chunk, next)) => {
                    self.phase = match next {
                        Some(c) => Phase::Objects(Some(c)),
                        None => Phase::Trailer,
                    };
                    Some((Ok(Bytes::from(chunk)), self))
                }
                Err(e) => {
                    tracing::warn!(table = %self.table, error = %e, "export cut short");
                    Some((Err(std::io::Error::other(e.to_string())), self))
                }
            },
            Phase::Trailer => {
                let sha = hex(&std::mem::take(&mut self.hasher).finalize());
                let line = format!("{{\"count\":{},\"sha256\":\"{sha}\"}}\n", self.count);
                Some((Ok(Bytes::from(line)), self))
            }
            Phase::Done => None,
        }
    }

    /// One page of object lines, and where the next starts.
    async fn page(&mut self, cursor: Option<Cursor>) -> ApiResult<(Vec<u8>, Option<Cursor>)> {
        let table = self
            .state
            .table_for(&self.table, &self.who, Op::Read)
            .await?;
        let req = ScanRequest {
            limit: PAGE,
            cursor,
            ..ScanRequest::default()
        };
        let page = table.scan(&req, ReadFrom::Primary).await?;
        let mut out =
            Vec::with_capacity(page.items.iter().map(|(k, v)| k.len() + v.len() + 48).sum());
        for (i, (key, value)) in page.items.iter().enumerate() {
            let start = out.len();
            out.extend_from_slice(b"{\"key\":");
            let _ = serde_json::to_writer(&mut out, key.as_ref() as &str);
            out.extend_from_slice(b",\"value\":");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b",\"expires_at_ms\":");
            match page.deadlines.get(i).copied().unwrap_or(0) {
                0 => out.extend_from_slice(b"null"),
                ms => out.extend_from_slice(ms.to_string().as_bytes()),
            }
            out.extend_from_slice(b"}\n");
            self.hasher.update(&out[start..]);
            self.count += 1;
        }
        Ok((out, page.next_cursor))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Export a table.
///
/// Streams `application/x-ndjson`: the table's create body, then one line
/// `{"key","value","expires_at_ms"}` per object (an absolute deadline in
/// Unix milliseconds, or null) in scan order, then `{"count","sha256"}`
/// over the object lines exactly as sent, each with its newline. Memory
/// stays bounded whatever the table's size; a stream cut short has no
/// trailer, so an import refuses it. Needs read access.
#[utoipa::path(
    get,
    path = "/v1/tables/{table}/export",
    tag = "transfer",
    params(("table" = String, Path, description = "Table name")),
    responses(
        (status = 200, description = "The table as NDJSON", content_type = "application/x-ndjson", body = String,
         example = json!("{\"name\":\"users\",\"type\":\"set\",\"access\":\"protected\",\"persistence\":\"none\",\"auto_save_ms\":null,\"default_ttl_ms\":null,\"max_entries\":null,\"eviction\":\"none\",\"origin\":null}\n{\"key\":\"alice\",\"value\":{\"n\":1},\"expires_at_ms\":null}\n{\"count\":1,\"sha256\":\"…\"}\n")),
        (status = 403, description = "Not allowed to read the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn export_table(
    State(state): State<AppState>,
    who: Principal,
    TablePath(name): TablePath,
) -> ApiResult<Response> {
    let header = {
        let table = state.table_for(&name, &who, Op::Read).await?;
        header_line(&table)?
    };
    let export = Export {
        state,
        who,
        table: name,
        phase: Phase::Header(header),
        hasher: Sha256::new(),
        count: 0,
    };
    let stream = futures_util::stream::unfold(export, Export::next);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(resp)
}

/// Query of an import.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ImportParams {
    /// Import under this name instead of the one in the stream.
    pub name: Option<String>,
}

/// An import's trailer.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct Trailer {
    count: u64,
    sha256: String,
}

/// An object line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ObjectLine {
    key: String,
    value: Json,
    expires_at_ms: Option<u64>,
}

fn bad(line: usize, why: impl std::fmt::Display) -> ApiError {
    ApiError::InvalidImport(format!("line {line}: {why}"))
}

/// Splits a body into lines, refusing more than `limit` bytes in all.
struct Lines {
    body: Body,
    buf: Vec<u8>,
    read: usize,
    limit: usize,
    ended: bool,
}

impl Lines {
    /// The next line without its `\n`; a last line without one is returned
    /// as it is.
    async fn next(&mut self) -> ApiResult<Option<Vec<u8>>> {
        loop {
            if let Some(at) = self.buf.iter().position(|b| *b == b'\n') {
                let rest = self.buf.split_off(at + 1);
                let mut line = std::mem::replace(&mut self.buf, rest);
                line.pop();
                return Ok(Some(line));
            }
            if self.ended {
                return Ok((!self.buf.is_empty()).then(|| std::mem::take(&mut self.buf)));
            }
            match self.body.frame().await {
                None => self.ended = true,
                Some(Err(e)) => {
                    return Err(ApiError::InvalidArgument(format!(
                        "could not read the body: {e}"
                    )))
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.read += data.len();
                        if self.read > self.limit {
                            return Err(ApiError::PayloadTooLarge(self.limit));
                        }
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

/// Import a table.
///
/// Takes what export streams (up to `--max-import-bytes`), checks every
/// line, the count and the checksum, and only then creates the table and
/// inserts its objects, all or nothing: 201 with the table info, or 400
/// `invalid_import` with a message that starts with `line N:`, or 409 if
/// the name exists (`?name=` imports under another name). Deadlines are
/// absolute: an object expires when the original would have, and one
/// already expired is skipped. The importer owns the new table; a table
/// with an `origin` needs an admin. On a `sync` table the objects are on
/// disk when it answers.
#[utoipa::path(
    post,
    path = "/v1/tables/import",
    tag = "transfer",
    params(ImportParams),
    request_body(content = String, content_type = "application/x-ndjson", description = "An export stream"),
    responses(
        (status = 201, description = "The imported table", body = super::tables::TableInfo),
        (status = 400, description = "invalid_import: the line that is wrong", body = ErrorBody),
        (status = 403, description = "An origin needs an admin", body = ErrorBody),
        (status = 409, description = "A table of that name exists", body = ErrorBody),
        (status = 413, description = "Larger than --max-import-bytes", body = ErrorBody),
    )
)]
pub async fn import_table(
    State(state): State<AppState>,
    who: Principal,
    QueryParams(params): QueryParams<ImportParams>,
    body: Body,
) -> ApiResult<Response> {
    let mut lines = Lines {
        body,
        buf: Vec::new(),
        read: 0,
        limit: state.limits.max_import_bytes,
        ended: false,
    };
    let Some(first) = lines.next().await? else {
        return Err(bad(1, "the stream is empty"));
    };
    let mut head: Map<String, Json> = serde_json::from_slice(&first)
        .map_err(|e| bad(1, format!("not a table's create body: {e}")))?;
    if let Some(name) = params.name {
        head.insert("name".into(), Json::String(name));
    }
    let spec = spec_from_body(&state, &who, head).map_err(|e| match e {
        ApiError::InvalidArgument(m) | ApiError::InvalidName(m) => bad(1, m),
        other => other,
    })?;
    if state.table_for(&spec.name, &who, Op::Read).await.is_ok()
        || state.store.table(&spec.name).is_ok()
    {
        return Err(ApiError::TableExists(spec.name));
    }

    let mut hasher = Sha256::new();
    let mut items: Vec<(String, Value, Expiry)> = Vec::new();
    let mut count = 0u64;
    let mut n = 1;
    let now = state.store.now_ms();
    let trailer = loop {
        n += 1;
        let Some(line) = lines.next().await? else {
            return Err(bad(n, "the stream ends before its trailer"));
        };
        let parsed: Json =
            serde_json::from_slice(&line).map_err(|e| bad(n, format!("not JSON: {e}")))?;
        if parsed.get("count").is_some() {
            let t: Trailer = serde_json::from_value(parsed)
                .map_err(|e| bad(n, format!("not a trailer: {e}")))?;
            break t;
        }
        let object: ObjectLine = serde_json::from_value(parsed)
            .map_err(|e| bad(n, format!("not an object line: {e}")))?;
        let key = checked_key(object.key).map_err(|e| bad(n, e.message()))?;
        hasher.update(&line);
        hasher.update(b"\n");
        count += 1;
        match object.expires_at_ms {
            Some(at) if at <= now => {}
            deadline => items.push((
                key,
                Value::from_json(&object.value),
                Expiry::At(deadline.unwrap_or(0)),
            )),
        }
    };
    if let Some(extra) = lines.next().await? {
        if !extra.iter().all(u8::is_ascii_whitespace) {
            return Err(bad(n + 1, "nothing may follow the trailer"));
        }
    }
    if trailer.count != count {
        return Err(bad(
            n,
            format!(
                "the trailer counts {} objects, the stream has {count}",
                trailer.count
            ),
        ));
    }
    if trailer.sha256 != hex(&hasher.finalize()) {
        return Err(bad(n, "the checksum does not match the object lines"));
    }

    // Verified: create, then insert, all or nothing.
    let table = state.create_table(spec).await?;
    let restored = if items.is_empty() {
        Ok(0)
    } else {
        table.insert_many(items).await
    };
    if let Err(e) = restored {
        if let Err(undo) = state.drop_table(&table).await {
            tracing::warn!(error = %undo, "a failed import left its table behind");
        }
        return Err(e);
    }
    info_response(StatusCode::CREATED, &table).await
}
