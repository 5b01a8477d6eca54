//! Export and import of a table as NDJSON (`ets:tab2file`/`file2tab` with
//! a checksum): a first line with the table's create body, one line per
//! object with its absolute expiry deadline, and a trailer with the count
//! and the SHA-256 of the object lines. Export streams page by page, so
//! memory stays bounded whatever the table's size; import verifies the
//! whole stream before it creates anything.
//!
//! Over 600 lines: export, import and their line reader are one format,
//! kept together so that what one writes the other verifies.

use super::direct::ApiRoutes;
use crate::api_routes;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::BytesMut;
use serde::Deserialize;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::auth::{authorize, Op, Principal};
use super::extract::{checked_key, next_data, QueryParams, TablePath};
use super::respond::{hex, push_opt_u64, push_str};
use super::tables::{info_response, spec_from_body};
use super::AppState;
use crate::api::error::{ApiError, ApiResult, ErrorBody};
use crate::ops::{ReadFrom, TableOps};
use crate::store::{Cursor, Expiry, Persistence, ScanRequest, Table, Value};

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
    /// The object lines: the rows of the page read last, then the page at
    /// the cursor, if there is one.
    Objects,
    Trailer,
}

/// Most bytes of object lines in one chunk of an export (a single longer
/// line goes alone): bounds what one export holds at a time.
const CHUNK_BYTES: usize = 256 * 1024;

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
    /// Objects of the page read last that are not sent yet.
    rows: std::collections::VecDeque<(crate::store::Key, Value, u64)>,
    /// Where the next page starts; `None` when the last page was read.
    cursor: Option<Cursor>,
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
            rows: std::collections::VecDeque::new(),
            cursor: None,
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
                self.rows.clear();
                self.cursor = Some(Cursor::start());
                self.phase = Phase::Objects;
                break header;
            },
            Phase::Objects => self.page().await.inspect(|_| {
                self.phase = if self.rows.is_empty() && self.cursor.is_none() {
                    Phase::Trailer
                } else {
                    Phase::Objects
                };
            }),
            Phase::Trailer => {
                let sha = hex(&std::mem::take(&mut self.hasher).finalize());
                Ok(format!("{{\"count\":{},\"sha256\":\"{sha}\"}}\n", self.count).into_bytes())
            }
        };
        match chunk {
            Ok(bytes) => {
                let bytes = super::scope::counted_in(self.state.tables.store().memory(), bytes);
                Some((Ok(bytes), self))
            }
            Err(e) => {
                tracing::warn!(table = %self.table, error = %e, "export cut short");
                self.queue.clear();
                Some((Err(std::io::Error::other(e.to_string())), self))
            }
        }
    }

    /// One chunk of object lines: at most [`CHUNK_BYTES`] (or one line)
    /// from the rows of the page read last, reading the next page first
    /// when none are left. Empty when a page had nothing to send.
    async fn page(&mut self) -> ApiResult<Vec<u8>> {
        if self.rows.is_empty() {
            let table = self
                .state
                .table_for(&self.table, &self.who, Op::Read)
                .await?;
            let req = ScanRequest {
                limit: PAGE,
                cursor: self.cursor.take().filter(|c| *c != Cursor::start()),
                ..ScanRequest::default()
            };
            let page = table.scan(&req, ReadFrom::Primary).await?;
            self.cursor = page.next_cursor;
            let deadlines = page.deadlines.iter().copied();
            self.rows = page
                .items
                .into_iter()
                .zip(deadlines)
                .map(|((k, v), d)| (k, v, d))
                .collect();
        }
        let mut out = Vec::new();
        while let Some((key, value, deadline)) = self.rows.front() {
            if !out.is_empty() && out.len() + key.len() + value.len() + 48 > CHUNK_BYTES {
                break;
            }
            let start = out.len();
            out.extend_from_slice(b"{\"key\":");
            push_str(&mut out, key);
            out.extend_from_slice(b",\"value\":");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b",\"expires_at_ms\":");
            push_opt_u64(&mut out, Some(*deadline).filter(|ms| *ms != 0));
            out.extend_from_slice(b"}\n");
            self.hasher.update(&out[start..]);
            self.count += 1;
            self.rows.pop_front();
        }
        Ok(out)
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
        .tables
        .all()
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

/// Splits a body into lines, refusing more than `limit` bytes in all and
/// any line longer than `max_line`. Each byte is looked at once, however
/// the lines are cut into pieces on the wire.
struct Lines {
    body: Body,
    buf: BytesMut,
    /// Bytes at the front of `buf` known to hold no line feed.
    scanned: usize,
    read: usize,
    limit: usize,
    max_line: usize,
    ended: bool,
    /// Bytes looked at for line feeds so far: the body's length at most,
    /// whatever its pieces (a test holds it to that).
    looked: usize,
}

impl Lines {
    /// The next line without its `\n`; a last line without one is returned
    /// as it is. `n` is the line's number, for the error of one too long.
    async fn next(&mut self, n: usize) -> ApiResult<Option<Bytes>> {
        let too_long = || {
            bad(
                n,
                format!(
                    "the line is longer than {} bytes (--max-body-bytes)",
                    self.max_line
                ),
            )
        };
        loop {
            let found = self.buf[self.scanned..].iter().position(|b| *b == b'\n');
            self.looked += found.map_or(self.buf.len() - self.scanned, |at| at + 1);
            if let Some(at) = found {
                let end = self.scanned + at;
                if end > self.max_line {
                    return Err(too_long());
                }
                let mut line = self.buf.split_to(end + 1);
                self.scanned = 0;
                line.truncate(end);
                return Ok(Some(line.freeze()));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max_line {
                return Err(too_long());
            }
            if self.ended {
                self.scanned = 0;
                return Ok((!self.buf.is_empty()).then(|| self.buf.split().freeze()));
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
    let mut reader = Reader::new(
        body,
        state.limits.max_import_bytes,
        state.limits.max_body_bytes,
    );
    let Some(section) = reader.section(&state, &who, params.name).await? else {
        return Err(bad(1, "the stream is empty"));
    };
    if let Some(extra) = reader.lines.next(reader.n + 1).await? {
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
    let mut reader = Reader::new(
        body,
        state.limits.max_import_bytes,
        state.limits.max_body_bytes,
    );
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

/// One verified table of an import stream, its objects staged in a table
/// no lookup finds.
struct Section {
    spec: crate::store::TableSpec,
    staged: Staged,
    /// Its first line's number, for messages.
    first_line: usize,
}

/// Objects of an import inserted this many at a time into their staging
/// table (or fewer, once they reach [`IMPORT_BATCH_BYTES`]).
const IMPORT_BATCH: usize = 1000;
/// Bytes of keys and values after which a staging batch is inserted.
const IMPORT_BATCH_BYTES: usize = 1 << 20;

/// A table an import fills before anyone can see it: counted in the
/// server's memory like any table (so `--max-memory-bytes` bounds an
/// import), and emptied when the import fails.
struct Staged(Option<Arc<Table>>);

impl Staged {
    fn table(&self) -> ApiResult<&Arc<Table>> {
        self.0
            .as_ref()
            .ok_or_else(|| ApiError::Internal("an import's staging table is gone".into()))
    }

    /// Inserts one batch, all or nothing.
    fn insert(&self, batch: Vec<(String, Value, Expiry)>) -> ApiResult<()> {
        if !batch.is_empty() {
            self.table()?.insert_many(batch)?;
        }
        Ok(())
    }

    /// The staged table, which from now on is someone else's to keep or
    /// empty.
    fn take(mut self) -> ApiResult<Arc<Table>> {
        self.0
            .take()
            .ok_or_else(|| ApiError::Internal("an import's staging table is gone".into()))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(table) = self.0.take() {
            table.clear();
        }
    }
}

/// Reads tables from an import stream, counting lines.
struct Reader {
    lines: Lines,
    /// The number of the last line read.
    n: usize,
}

impl Reader {
    fn new(body: Body, limit: usize, max_line: usize) -> Self {
        Reader {
            lines: Lines {
                body,
                buf: BytesMut::new(),
                scanned: 0,
                read: 0,
                limit,
                max_line,
                ended: false,
                looked: 0,
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
            let Some(line) = self.lines.next(self.n + 1).await? else {
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
        let staged = Staged(Some(state.tables.store().detached_table(spec.clone())?));
        let mut hasher = Sha256::new();
        let mut batch = Vec::with_capacity(IMPORT_BATCH);
        let mut batch_bytes = 0;
        let mut count = 0u64;
        let now = state.tables.store().now_ms();
        let raw_values = spec.settings.values == crate::store::ValueKind::Any;
        // Imports are not bound by the request deadline, only by their
        // limits; they still give the worker back between batches.
        let mut pace = crate::pace::Pace::new(None);
        let trailer = loop {
            self.n += 1;
            let n = self.n;
            let Some(line) = self.lines.next(n).await? else {
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
                deadline => {
                    let value = super::raw::accept(raw_values, Value::from_json(&object.value))
                        .map_err(|e| bad(n, e.message()))?;
                    batch_bytes += key.len() + value.len();
                    batch.push((key, value, Expiry::At(deadline.unwrap_or(0))));
                }
            }
            if batch.len() >= IMPORT_BATCH || batch_bytes >= IMPORT_BATCH_BYTES {
                staged.insert(std::mem::replace(
                    &mut batch,
                    Vec::with_capacity(IMPORT_BATCH),
                ))?;
                batch_bytes = 0;
                pace.tick().await;
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
        staged.insert(batch)?;
        Ok(Some(Section {
            spec,
            staged,
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

/// Makes the sections' tables visible, all or nothing: on any failure
/// every table made here is dropped again. Each staged table goes to the
/// tier its persistence names ([`crate::tables::Tables::restore`]); when a
/// `sync` table was among them, the answer waits until its objects are on
/// disk.
async fn restore(
    state: &AppState,
    sections: Vec<Section>,
) -> ApiResult<Vec<crate::tables::TableHandle<'_>>> {
    let mut created = Vec::with_capacity(sections.len());
    let mut failed = None;
    let mut sync = false;
    for section in sections {
        sync |= section.spec.settings.persistence == Persistence::Sync;
        let made = match section.staged.take() {
            Ok(staged) => state
                .tables
                .restore(section.spec, staged)
                .await
                .map_err(ApiError::from),
            Err(e) => Err(e),
        };
        match made {
            Ok(t) => created.push(t),
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    if failed.is_none() && sync {
        if let Err(e) = state.tables.wait_durable().await {
            failed = Some(e.into());
        }
    }
    let Some(e) = failed else {
        return Ok(created);
    };
    for table in &created {
        if let Err(undo) = state.tables.drop_table(table).await {
            tracing::warn!(error = %undo, "a failed import left a table behind");
        }
    }
    Err(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body of `pieces`, arriving one at a time.
    fn body(pieces: Vec<Vec<u8>>) -> Body {
        let stream = futures_util::stream::iter(
            pieces
                .into_iter()
                .map(|p| Ok::<_, std::io::Error>(Bytes::from(p))),
        );
        Body::from_stream(stream)
    }

    #[tokio::test]
    async fn lines_are_split_looking_at_each_byte_once() {
        let long = 8 << 20;
        let mut text = vec![b'a'; long];
        text.extend_from_slice(b"\nshort\n\nlast");
        let total = text.len();
        let pieces: Vec<Vec<u8>> = text.chunks(4096).map(<[u8]>::to_vec).collect();
        let mut reader = Reader::new(body(pieces), usize::MAX, usize::MAX);
        let lines = &mut reader.lines;
        assert_eq!(lines.next(1).await.unwrap().unwrap().len(), long);
        assert_eq!(&lines.next(2).await.unwrap().unwrap()[..], b"short");
        assert_eq!(&lines.next(3).await.unwrap().unwrap()[..], b"");
        assert_eq!(&lines.next(4).await.unwrap().unwrap()[..], b"last");
        assert!(lines.next(5).await.unwrap().is_none());
        assert!(
            lines.looked <= total,
            "looked at {} bytes of {total}",
            lines.looked
        );
    }

    #[tokio::test]
    async fn a_line_past_the_limit_is_refused_before_it_is_all_read() {
        let pieces: Vec<Vec<u8>> = (0..100).map(|_| vec![b'b'; 1024]).collect();
        let mut reader = Reader::new(body(pieces), usize::MAX, 10 * 1024);
        let err = reader.lines.next(7).await.expect_err("too long");
        assert!(
            err.message().starts_with("line 7: the line is longer"),
            "{err}"
        );
        assert!(
            reader.lines.read < 20 * 1024,
            "stopped after {}",
            reader.lines.read
        );
    }
}
