//! Export and import of a table as NDJSON (`ets:tab2file`/`file2tab` with
//! a checksum): a first line with the table's create body, one line per
//! object with its absolute expiry deadline, and a trailer with the count
//! and the SHA-256 of the object lines. Export streams page by page, so
//! memory stays bounded whatever the table's size; import verifies the
//! whole stream before it creates anything.

use super::direct::ApiRoutes;
use crate::api_routes;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::auth::{authorize, Op, Principal};
use super::extract::{checked_key, next_data, QueryParams, TablePath};
use super::respond::{hex, push_opt_u64, push_str};
use super::tables::{info_response, spec_from_body};
use super::AppState;
use crate::error::{ApiError, ApiResult, ErrorBody};
use crate::ops::{ReadFrom, TableOps};
use crate::store::{Cursor, Expiry, ScanRequest, Value};

/// Routes for export and import.
pub fn router() -> ApiRoutes {
    ApiRoutes::new()
        .routes(api_routes!(export_table))
        .routes(api_routes!(import_table))
        .routes(api_routes!(export_all))
        .routes(api_routes!(import_all))
}

/// Objects per page of an export.
const PAGE: usize = 1000;

/// The media type of exports and imports.
const NDJSON: &str = "application/x-ndjson";

/// Where an export is.
enum Phase {
    /// Between tables: the next one's first line comes next.
    Next,
    Objects(Option<Cursor>),
    Trailer,
}

/// An export in progress: what the stream needs between pages.
struct Export {
    state: AppState,
    who: Principal,
    /// Tables still to export, in order.
    queue: std::collections::VecDeque<String>,
    /// The table being exported.
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
    fn new(state: AppState, who: Principal, tables: Vec<String>) -> Self {
        Export {
            state,
            who,
            queue: tables.into(),
            table: String::new(),
            phase: Phase::Next,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// The next chunk of the stream, or `None` at its end. An error ends
    /// the stream without a trailer, so an importer can tell.
    async fn next(mut self) -> Option<(Result<Bytes, std::io::Error>, Export)> {
        let chunk = match std::mem::replace(&mut self.phase, Phase::Next) {
            Phase::Next => loop {
                let name = self.queue.pop_front()?;
                let header = match self.state.table_for(&name, &self.who, Op::Read).await {
                    // Dropped (or given away) since the export began: skip it.
                    Err(ApiError::TableNotFound(_) | ApiError::Forbidden(_)) => continue,
                    Err(e) => Err(e),
                    Ok(table) => header_line(&table),
                };
                self.table = name;
                self.hasher = Sha256::new();
                self.count = 0;
                self.phase = Phase::Objects(None);
                break header;
            },
            Phase::Objects(cursor) => self.page(cursor).await.map(|(chunk, next)| {
                self.phase = match next {
                    Some(c) => Phase::Objects(Some(c)),
                    None => Phase::Trailer,
                };
                chunk
            }),
            Phase::Trailer => {
                let sha = hex(&std::mem::take(&mut self.hasher).finalize());
                Ok(format!("{{\"count\":{},\"sha256\":\"{sha}\"}}\n", self.count).into_bytes())
            }
        };
        match chunk {
            Ok(bytes) => Some((Ok(Bytes::from(bytes)), self)),
            Err(e) => {
                tracing::warn!(table = %self.table, error = %e, "export cut short");
                self.queue.clear();
                Some((Err(std::io::Error::other(e.to_string())), self))
            }
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
            push_str(&mut out, key);
            out.extend_from_slice(b",\"value\":");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b",\"expires_at_ms\":");
            let deadline = page.deadlines.get(i).copied().filter(|ms| *ms != 0);
            push_opt_u64(&mut out, deadline);
            out.extend_from_slice(b"}\n");
            self.hasher.update(&out[start..]);
            self.count += 1;
        }
        Ok((out, page.next_cursor))
    }
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
    // Refused (404, 403) before the stream starts.
    state.table_for(&name, &who, Op::Read).await?;
    Ok(ndjson(Export::new(state, who, vec![name.into()])))
}

/// The response streaming `export`.
fn ndjson(export: Export) -> Response {
    let stream = futures_util::stream::unfold(export, Export::next);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    resp
}

/// Export every table.
///
/// Streams every table the caller may read, in name order, one after
/// another, each as `GET /v1/tables/{table}/export` streams it (create
/// body, object lines, trailer). A table dropped while the export runs is
/// left out.
#[utoipa::path(
    get,
    path = "/v1/export",
    tag = "transfer",
    responses(
        (status = 200, description = "Every readable table as NDJSON", content_type = "application/x-ndjson", body = String),
    )
)]
pub async fn export_all(State(state): State<AppState>, who: Principal) -> Response {
    let names: Vec<String> = state
        .all_tables()
        .iter()
        .filter(|t| authorize(t.meta(), &who, Op::Read).is_ok())
        .map(|t| t.meta().name().to_owned())
        .collect();
    ndjson(Export::new(state, who, names))
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
            match next_data(&mut self.body, &mut self.read, self.limit).await? {
                None => self.ended = true,
                Some(data) => self.buf.extend_from_slice(&data),
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
    let mut reader = Reader::new(body, state.limits.max_import_bytes);
    let Some(section) = reader.section(&state, &who, params.name).await? else {
        return Err(bad(1, "the stream is empty"));
    };
    if let Some(extra) = reader.lines.next().await? {
        if !extra.iter().all(u8::is_ascii_whitespace) {
            return Err(bad(reader.n + 1, "nothing may follow the trailer"));
        }
    }
    refuse_taken(&state, &who, std::slice::from_ref(&section.spec.name)).await?;
    let mut created = restore(&state, vec![section]).await?;
    let table = created
        .pop()
        .ok_or_else(|| ApiError::Internal("nothing imported".into()))?;
    info_response(StatusCode::CREATED, &table).await
}

/// Import tables.
///
/// Takes what `GET /v1/export` streams: any number of tables one after
/// another, each checked as `POST /v1/tables/import` checks one. Creates
/// every table or none: 201 `{"tables": [info, …]}`, 400 `invalid_import`
/// with the line that is wrong, or 409 `table_exists` if any name exists.
#[utoipa::path(
    post,
    path = "/v1/import",
    tag = "transfer",
    request_body(content = String, content_type = "application/x-ndjson", description = "An export of several tables"),
    responses(
        (status = 201, description = "The imported tables", body = super::tables::TableList),
        (status = 400, description = "invalid_import: the line that is wrong", body = ErrorBody),
        (status = 403, description = "An origin needs an admin", body = ErrorBody),
        (status = 409, description = "A table of one of the names exists", body = ErrorBody),
        (status = 413, description = "Larger than --max-import-bytes", body = ErrorBody),
    )
)]
pub async fn import_all(
    State(state): State<AppState>,
    who: Principal,
    body: Body,
) -> ApiResult<Response> {
    let mut reader = Reader::new(body, state.limits.max_import_bytes);
    let mut sections = Vec::new();
    while let Some(section) = reader.section(&state, &who, None).await? {
        if sections
            .iter()
            .any(|s: &Section| s.spec.name == section.spec.name)
        {
            return Err(bad(
                section.first_line,
                format!("table '{}' appears twice", section.spec.name),
            ));
        }
        sections.push(section);
    }
    if sections.is_empty() {
        return Err(bad(1, "the stream is empty"));
    }
    let names: Vec<String> = sections.iter().map(|s| s.spec.name.clone()).collect();
    refuse_taken(&state, &who, &names).await?;
    let created = restore(&state, sections).await?;
    let mut tables = Vec::with_capacity(created.len());
    for t in &created {
        tables.push(super::tables::table_info(t).await?);
    }
    super::respond::serialized(StatusCode::CREATED, &super::tables::TableList { tables })
}

/// One verified table of an import stream.
struct Section {
    spec: crate::store::TableSpec,
    items: Vec<(String, Value, Expiry)>,
    /// Its first line's number, for messages.
    first_line: usize,
}

/// Reads tables from an import stream, counting lines.
struct Reader {
    lines: Lines,
    /// The number of the last line read.
    n: usize,
}

impl Reader {
    fn new(body: Body, limit: usize) -> Self {
        Reader {
            lines: Lines {
                body,
                buf: Vec::new(),
                read: 0,
                limit,
                ended: false,
            },
            n: 0,
        }
    }

    /// The next table, verified against its trailer; `None` at the end of
    /// the stream (blank lines between tables are skipped).
    async fn section(
        &mut self,
        state: &AppState,
        who: &Principal,
        rename: Option<String>,
    ) -> ApiResult<Option<Section>> {
        let first = loop {
            let Some(line) = self.lines.next().await? else {
                return Ok(None);
            };
            self.n += 1;
            if !line.iter().all(u8::is_ascii_whitespace) {
                break line;
            }
        };
        let first_line = self.n;
        let not_a_head =
            |e: &dyn std::fmt::Display| bad(first_line, format!("not a table's create body: {e}"));
        let mut head: Map<String, Json> = match crate::json::parse_value(&first) {
            Ok(Json::Object(head)) => head,
            Ok(_) => return Err(not_a_head(&"not an object")),
            Err(e) => return Err(not_a_head(&e)),
        };
        if let Some(name) = rename {
            head.insert("name".into(), Json::String(name));
        }
        let spec = spec_from_body(state, who, head).map_err(|e| match e {
            ApiError::InvalidArgument(m) | ApiError::InvalidName(m) => bad(first_line, m),
            other => other,
        })?;
        let mut hasher = Sha256::new();
        let mut items = Vec::new();
        let mut count = 0u64;
        let now = state.store.now_ms();
        let trailer = loop {
            self.n += 1;
            let n = self.n;
            let Some(line) = self.lines.next().await? else {
                return Err(bad(n, "the stream ends before its trailer"));
            };
            let parsed: Json =
                crate::json::parse_value(&line).map_err(|e| bad(n, format!("not JSON: {e}")))?;
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
                // Expired already: counted in the checksum, not restored.
                Some(at) if at <= now => {}
                deadline => items.push((
                    key,
                    Value::from_json(&object.value),
                    Expiry::At(deadline.unwrap_or(0)),
                )),
            }
        };
        if trailer.count != count {
            return Err(bad(
                self.n,
                format!(
                    "the trailer counts {} objects, the stream has {count}",
                    trailer.count
                ),
            ));
        }
        if trailer.sha256 != hex(&hasher.finalize()) {
            return Err(bad(self.n, "the checksum does not match the object lines"));
        }
        Ok(Some(Section {
            spec,
            items,
            first_line,
        }))
    }
}

/// 409 if any of `names` is a table already (whoever may read it).
async fn refuse_taken(state: &AppState, who: &Principal, names: &[String]) -> ApiResult<()> {
    for name in names {
        match state.table_for(name, who, Op::Read).await {
            Err(ApiError::TableNotFound(_)) => {}
            Err(ApiError::Forbidden(_)) | Ok(_) => return Err(ApiError::TableExists(name.clone())),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Creates the sections' tables and inserts their objects, all or nothing:
/// on any failure every table made here is dropped again.
async fn restore(
    state: &AppState,
    sections: Vec<Section>,
) -> ApiResult<Vec<crate::ops::TableHandle<'_>>> {
    let mut created = Vec::with_capacity(sections.len());
    let mut failed = None;
    for section in sections {
        let table = match state.create_table(section.spec).await {
            Ok(t) => t,
            Err(e) => {
                failed = Some(e);
                break;
            }
        };
        let inserted = if section.items.is_empty() {
            Ok(0)
        } else {
            table.insert_many(section.items).await
        };
        created.push(table);
        if let Err(e) = inserted {
            failed = Some(e);
            break;
        }
    }
    let Some(e) = failed else {
        return Ok(created);
    };
    for table in &created {
        if let Err(undo) = state.drop_table(table).await {
            tracing::warn!(error = %undo, "a failed import left a table behind");
        }
    }
    Err(e)
}
