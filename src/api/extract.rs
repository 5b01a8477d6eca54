//! Extractors that turn every malformed request into our JSON error shape.
//!
//! Bodies are read as bytes and parsed as JSON whatever their Content-Type,
//! so `curl -d` works. The table and key are decoded here from their fixed
//! places in the path; query strings go through axum's parser. Every
//! rejection is mapped to `invalid_name`, `invalid_key` or
//! `invalid_argument`.

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header;
use axum::http::request::Parts;
use bytes::{Bytes, BytesMut};
use serde::de::DeserializeOwned;

use super::respond::{tag_list, write_precondition, TagList};
use super::AppState;
use crate::api::error::ApiError;
use crate::store::{validate_key, validate_table_name, Key, Precondition};

/// A JSON body of type `T`, parsed whatever the Content-Type says.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// The raw body bytes, with the size limit mapped to 413.
#[derive(Debug)]
pub struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        read_body(req.into_body(), state.limits.max_body_bytes)
            .await
            .map(RawBody)
    }
}

/// Reads a whole body of at most `limit` bytes. A body that arrives in one
/// piece (any small one) is kept as it came, without a copy, and reading
/// stops as soon as the body says it is complete instead of waiting to be
/// told there is nothing more.
async fn read_body(mut body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body::Body as _;
    let mut first = Bytes::new();
    let mut joined = BytesMut::new();
    let mut seen = 0usize;
    while !body.is_end_stream() {
        let Some(data) = next_data(&mut body, &mut seen, limit).await? else {
            break;
        };
        if first.is_empty() && joined.is_empty() {
            first = data;
        } else {
            if joined.is_empty() {
                joined.extend_from_slice(&std::mem::take(&mut first));
            }
            joined.extend_from_slice(&data);
        }
    }
    Ok(if joined.is_empty() {
        first
    } else {
        joined.freeze()
    })
}

/// The next piece of `body`'s data, or `None` at its end; trailers are
/// skipped (nothing reads them). `seen` counts the bytes read so far, and
/// more than `limit` in all is 413.
///
/// # Errors
/// [`ApiError::PayloadTooLarge`], or [`ApiError::InvalidArgument`] when the
/// body cannot be read.
pub async fn next_data(
    body: &mut Body,
    seen: &mut usize,
    limit: usize,
) -> Result<Option<Bytes>, ApiError> {
    use http_body_util::BodyExt;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::InvalidArgument(format!("could not read the body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            *seen += data.len();
            if *seen > limit {
                return Err(ApiError::PayloadTooLarge(limit));
            }
            return Ok(Some(data));
        }
    }
    Ok(None)
}

/// Parses JSON text into `T`, telling malformed text (`invalid_json`:
/// a syntax error, or an object that repeats a member name) from
/// well-formed JSON of the wrong shape (`invalid_argument`).
///
/// # Errors
/// [`ApiError::InvalidJson`] or [`ApiError::InvalidArgument`].
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let malformed = |e: serde_json::Error| ApiError::InvalidJson(e.to_string());
    match serde_json::from_slice(bytes) {
        Ok(parsed) => {
            // `T` may have kept the last of repeated members.
            crate::json::check_unique_members(bytes).map_err(malformed)?;
            Ok(parsed)
        }
        Err(e) if e.classify() != serde_json::error::Category::Data => Err(malformed(e)),
        // serde reports a type mismatch as soon as it sees one, even when
        // the text goes on to be malformed: check the text before blaming
        // its shape.
        Err(e) => match crate::json::check_unique_members(bytes) {
            Err(bad) => Err(malformed(bad)),
            Ok(()) => Err(ApiError::InvalidArgument(e.to_string())),
        },
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Parses JSON text that must be an object into `T`. serde would also read
/// a struct from an array of its fields in order; a client never means that.
///
/// # Errors
/// [`ApiError::InvalidJson`] or [`ApiError::InvalidArgument`].
///
/// Text that is an object is read straight into `T` (and checked for
/// repeated members); only when that fails is it read as a map first and
/// `T` taken from the map, which gives the error. Both ways read the same
/// `T` from any object `T` accepts, and the direct one skips building a
/// tree.
pub fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let starts_an_object = bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'{');
    if starts_an_object {
        if let Ok(direct) = serde_json::from_slice(bytes) {
            crate::json::check_unique_members(bytes)
                .map_err(|e| ApiError::InvalidJson(e.to_string()))?;
            return Ok(direct);
        }
    }
    let map: serde_json::Map<String, serde_json::Value> = parse_json(bytes)?;
    from_object(map)
}

/// Reads `T` from an already parsed JSON object.
///
/// # Errors
/// [`ApiError::InvalidArgument`].
pub fn from_object<T: DeserializeOwned>(
    map: serde_json::Map<String, serde_json::Value>,
) -> Result<T, ApiError> {
    serde_json::from_value(serde_json::Value::Object(map))
        .map_err(|e| ApiError::InvalidArgument(e.to_string()))
}

/// A JSON object body read into the struct `T`.
#[derive(Debug)]
pub struct JsonObject<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonObject<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        parse_object(&bytes).map(JsonObject)
    }
}

/// Like [`JsonObject`], but an empty body reads as `T::default()`; for bodies
/// whose every field is optional.
#[derive(Debug)]
pub struct OptionalJsonBody<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let RawBody(bytes) = RawBody::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse_object(&bytes).map(OptionalJsonBody)
    }
}

/// Query parameters of type `T`; unknown, duplicate or mistyped ones are 400.
#[derive(Debug)]
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| QueryParams(q))
            .map_err(|e: QueryRejection| ApiError::InvalidArgument(e.body_text()))
    }
}

/// `{table}` from the path, checked against the naming rules.
#[derive(Debug)]
pub struct TablePath(pub Key);

/// `{table}` and `{key}` from the path, both checked.
#[derive(Debug)]
pub struct EntryPath(pub Key, pub Key);

/// Whether a raw path segment has a `%` not followed by two hex digits.
fn malformed_escape(segment: &str) -> bool {
    let b = segment.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

/// The raw table (segment 3) and key (segment 5, if any) of a path shaped
/// `/v1/tables/{table}[/entries/{key}…]`, counting the empty segment before
/// the first `/`. Every route that takes [`TablePath`] or [`EntryPath`] has
/// that shape (a test checks every route in the spec), so they are read
/// here in one pass instead of through axum's copy of the route's captures
/// (a vector and a string per capture, per request).
fn raw_captures(path: &str) -> (Option<&str>, Option<&str>) {
    let bytes = path.as_bytes();
    let (mut table, mut start) = (None, 0);
    for index in 0..=KEY_SEGMENT {
        let end = bytes[start..]
            .iter()
            .position(|&b| b == b'/')
            .map_or(bytes.len(), |at| start + at);
        match index {
            TABLE_SEGMENT => table = path.get(start..end),
            KEY_SEGMENT => return (table, path.get(start..end)),
            _ => {}
        }
        if end == bytes.len() {
            break;
        }
        start = end + 1;
    }
    (table, None)
}

/// A raw capture, percent-decoded. `invalid` makes the error for a
/// malformed escape or bytes that are not UTF-8 once decoded.
fn decoded(raw: &str, invalid: fn(&str) -> ApiError) -> Result<Key, ApiError> {
    if !raw.contains('%') {
        return Ok(Key::from(raw));
    }
    if malformed_escape(raw) {
        return Err(invalid("a malformed percent-escape"));
    }
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .map(|text| Key::from(text.as_ref()))
        .map_err(|_| invalid("bytes that are not valid percent-encoded UTF-8"))
}

fn invalid_table(what: &str) -> ApiError {
    ApiError::InvalidName(format!("table name has {what}"))
}

fn invalid_key(what: &str) -> ApiError {
    ApiError::InvalidKey(format!("key has {what}"))
}

/// The route lacks a capture the extractor needs: a routing mistake.
fn missing(name: &str) -> ApiError {
    ApiError::Internal(format!("route lacks the {name} parameter"))
}

/// Where `{table}` is in the path's segments.
const TABLE_SEGMENT: usize = 3;
/// Where `{key}` is in the path's segments.
const KEY_SEGMENT: usize = 5;

fn checked_table<T: AsRef<str>>(name: T) -> Result<T, ApiError> {
    validate_table_name(name.as_ref()).map_err(|e| ApiError::InvalidName(e.to_string()))?;
    Ok(name)
}

/// Checks a key from a path, query or body.
///
/// # Errors
/// [`ApiError::InvalidKey`].
pub fn checked_key<K: AsRef<str>>(key: K) -> Result<K, ApiError> {
    validate_key(key.as_ref()).map_err(|e| ApiError::InvalidKey(e.to_string()))?;
    Ok(key)
}

impl<S: Send + Sync> FromRequestParts<S> for TablePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let (table, _) = raw_captures(parts.uri.path());
        let table = decoded(table.ok_or_else(|| missing("table"))?, invalid_table)?;
        Ok(TablePath(checked_table(table)?))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for EntryPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let (table, key) = raw_captures(parts.uri.path());
        let table = decoded(table.ok_or_else(|| missing("table"))?, invalid_table)?;
        let key = decoded(key.ok_or_else(|| missing("key"))?, invalid_key)?;
        Ok(EntryPath(checked_table(table)?, checked_key(key)?))
    }
}

/// The conditional-request headers of an entry request, read from the
/// request itself rather than from a copy of its header map (taking
/// `HeaderMap` as an extractor clones every header, on every request).
/// A request's `Content-Type`, if it sent one: what an entry `PUT` on a
/// `"values": "any"` table reads to tell JSON from raw bytes.
#[derive(Debug)]
pub struct ContentType(pub Option<axum::http::HeaderValue>);

impl<S: Send + Sync> FromRequestParts<S> for ContentType {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(ContentType(
            parts.headers.get(header::CONTENT_TYPE).cloned(),
        ))
    }
}

/// Each parse result is kept, so a malformed header is reported by the
/// handler where it looks, after the table is found.
#[derive(Debug)]
pub struct Conditions {
    /// `If-Match`, if sent.
    pub if_match: Result<Option<TagList>, ApiError>,
    /// `If-None-Match`, if sent.
    pub if_none_match: Result<Option<TagList>, ApiError>,
    /// `Cache-Control` holds `no-cache`: a read-through request asks for
    /// the origin's copy.
    pub no_cache: bool,
    /// `If-Modified-Since`, in Unix seconds; `None` when absent or not a
    /// valid HTTP date (which RFC 9110 says to ignore).
    pub if_modified_since: Option<u32>,
}

impl Conditions {
    /// The precondition of a write.
    ///
    /// # Errors
    /// [`ApiError::InvalidArgument`] for a malformed header or a
    /// combination writes do not support.
    pub fn for_write(self) -> Result<Precondition, ApiError> {
        write_precondition(self.if_match?, self.if_none_match?)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Conditions {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let no_cache = parts
            .headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| d.trim().eq_ignore_ascii_case("no-cache"));
        Ok(Conditions {
            if_match: tag_list(&parts.headers, header::IF_MATCH),
            if_none_match: tag_list(&parts.headers, header::IF_NONE_MATCH),
            no_cache,
            if_modified_since: parts
                .headers
                .get(header::IF_MODIFIED_SINCE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{KEY_SEGMENT, TABLE_SEGMENT};

    #[test]
    fn objects_read_the_same_directly_or_through_a_map() {
        use super::parse_object;
        use crate::store::CounterOp;
        let op: CounterOp = parse_object(br#" {"incr": 5, "default": 0} "#).expect("an object");
        assert_eq!((op.incr, op.default), (5, Some(0)));
        for (text, code) in [
            (&br#"{"incr":1,"incr":7}"#[..], "invalid_json"),
            (br#"{"incr":1,"x":{"a":1,"a":2}}"#, "invalid_json"),
            (br#"[3]"#, "invalid_argument"),
            (br#"{"incr":"x"}"#, "invalid_argument"),
            (br#"{"nope":1}"#, "invalid_argument"),
            (br#"{"incr":1"#, "invalid_json"),
            (br#"{"incr":1} x"#, "invalid_json"),
        ] {
            let err = parse_object::<CounterOp>(text).expect_err("refused");
            assert_eq!(err.code(), code, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn captures_are_read_from_their_places() {
        use super::raw_captures;
        assert_eq!(raw_captures("/v1/tables/t"), (Some("t"), None));
        assert_eq!(raw_captures("/v1/tables/t/sync"), (Some("t"), None));
        assert_eq!(
            raw_captures("/v1/tables/t/entries/k%2F1"),
            (Some("t"), Some("k%2F1"))
        );
        assert_eq!(
            raw_captures("/v1/tables/t/entries/k/counter"),
            (Some("t"), Some("k"))
        );
        assert_eq!(raw_captures("/v1/tables//entries/"), (Some(""), Some("")));
        assert_eq!(raw_captures("/v1"), (None, None));
    }

    /// [`super::raw_captures`] relies on every route's `{table}` and
    /// `{key}` being at fixed places.
    #[test]
    fn every_route_has_its_table_and_key_where_the_extractors_look() {
        let spec = super::super::openapi();
        let mut checked = 0;
        for path in spec.paths.paths.keys() {
            let segments: Vec<&str> = path.split('/').collect();
            for (name, at) in [("{table}", TABLE_SEGMENT), ("{key}", KEY_SEGMENT)] {
                if let Some(found) = segments.iter().position(|s| *s == name) {
                    assert_eq!(found, at, "{name} in {path}");
                    checked += 1;
                }
            }
        }
        assert!(checked >= 10, "only {checked} captures checked");
    }
}
