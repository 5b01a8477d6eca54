//! Response bodies built straight from stored JSON text, and ETag handling.
//!
//! Values are kept as canonical JSON bytes, so responses splice them in
//! rather than re-serializing a tree.

use std::cell::RefCell;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::BytesMut;

use crate::api::error::{ApiError, ApiResult};
use crate::store::{Cursor, Entry, Objects, Precondition, ScanPage};

/// `X-Cache` value for an answer served from memory.
pub const HIT: &str = "HIT";
/// `X-Cache` value for an answer that was not in memory.
pub const MISS: &str = "MISS";
/// `X-Cache` value for an expired copy served because the origin failed.
pub const STALE: &str = "STALE";

/// A response with a JSON body.
pub fn json(status: StatusCode, body: Vec<u8>) -> Response {
    let mut resp = Response::new(Body::from(super::scope::counted(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// A response with `body` serialized as JSON.
///
/// # Errors
/// [`ApiError::Internal`] if `body` cannot be serialized (no type the API
/// answers with can fail).
pub fn serialized<T: serde::Serialize>(status: StatusCode, body: &T) -> ApiResult<Response> {
    let bytes = serde_json::to_vec(body).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(json(status, bytes))
}

/// A response with no body.
pub fn empty(status: StatusCode) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    resp
}

/// Lowercase hex text of `bytes` (digests in answers and records).
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Appends `s` as a JSON string literal.
pub fn push_str(buf: &mut Vec<u8>, s: &str) {
    crate::store::push_json_str(buf, s);
}

/// Appends an optional number as JSON (`null` for none).
pub fn push_opt_u64(buf: &mut Vec<u8>, n: Option<u64>) {
    match n {
        Some(n) => buf.extend_from_slice(n.to_string().as_bytes()),
        None => buf.extend_from_slice(b"null"),
    }
}

/// `{"key":k,"value":v,"ttl_ms":n}` for set types, `{"key":k,"values":[…],"ttl_ms":n}`
/// for bag types.
pub fn entry_body(key: &str, entry: &Entry) -> Vec<u8> {
    let mut buf = Vec::with_capacity(entry_body_len(key, entry));
    buf.extend_from_slice(b"{\"key\":");
    push_str(&mut buf, key);
    match &entry.objects {
        Objects::One(v) => {
            buf.extend_from_slice(b",\"value\":");
            buf.extend_from_slice(v.as_bytes());
        }
        Objects::Many(_) => {
            buf.extend_from_slice(b",\"values\":[");
            for (i, v) in entry.objects.values().enumerate() {
                if i > 0 {
                    buf.push(b',');
                }
                buf.extend_from_slice(v.as_bytes());
            }
            buf.push(b']');
        }
    }
    buf.extend_from_slice(b",\"ttl_ms\":");
    push_opt_u64(&mut buf, entry.ttl_ms);
    buf.push(b'}');
    buf
}

/// The length of [`entry_body`]'s answer, exact when the key needs no
/// escapes (nearly always): a body whose length falls short of its
/// capacity costs an allocation more when it becomes the answer's bytes.
fn entry_body_len(key: &str, entry: &Entry) -> usize {
    let key_len = match crate::store::string_end(key.as_bytes()) {
        None => key.len() + 2,
        // Escapes grow the key; room for some, and the rest by growing.
        Some(_) => key.len() + 18,
    };
    let values = match &entry.objects {
        Objects::One(v) => r#","value":"#.len() + v.len(),
        Objects::Many(_) => {
            let (count, bytes) = entry
                .objects
                .values()
                .fold((0usize, 0usize), |(n, b), v| (n + 1, b + v.len()));
            r#","values":[]"#.len() + bytes + count.saturating_sub(1)
        }
    };
    let ttl = entry
        .ttl_ms
        .map_or(4, |n| n.checked_ilog10().unwrap_or(0) as usize + 1);
    r#"{"key":"#.len() + key_len + values + r#","ttl_ms":}"#.len() + ttl
}

/// `{"entries":[{"key":k,"value":v}…],"next_cursor":c}`, at most
/// `max_bytes` long: the item that would cross it ends the page there,
/// with a cursor that resumes at it.
///
/// # Errors
/// [`ApiError::ResultTooLarge`] when the first item alone crosses it.
pub fn scan_body(page: &ScanPage, max_bytes: usize) -> Result<Vec<u8>, ApiError> {
    const ROOM: usize = 2200;
    let limit = max_bytes.saturating_sub(ROOM);
    // Sized for the whole page up front: keys, values and the punctuation
    // around each item (keys that need escaping may still grow it).
    let size: usize = page.items.iter().map(|(k, v)| k.len() + v.len() + 24).sum();
    let mut buf = Vec::with_capacity((64 + size).min(max_bytes));
    buf.extend_from_slice(b"{\"entries\":[");
    let mut next_cursor = page.next_cursor.clone();
    for (i, (key, value)) in page.items.iter().enumerate() {
        let mark = buf.len();
        if i > 0 {
            buf.push(b',');
        }
        buf.extend_from_slice(b"{\"key\":");
        push_str(&mut buf, key);
        buf.extend_from_slice(b",\"value\":");
        buf.extend_from_slice(value.as_bytes());
        buf.push(b'}');
        if buf.len() > limit {
            if i == 0 {
                return Err(ApiError::ResultTooLarge {
                    key: key.to_string(),
                    next_cursor: page.cursor_after(0).map(|c| c.encode()),
                    limit: max_bytes,
                });
            }
            buf.truncate(mark);
            next_cursor = page.cursor_after(i - 1);
            break;
        }
    }
    end_page(&mut buf, next_cursor.as_ref());
    Ok(buf)
}

/// `{"results":[r…],"next_cursor":c}`: `results` is the results' JSON texts
/// already joined by commas, and the body is built in its buffer.
pub fn results_body(mut results: Vec<u8>, next_cursor: Option<&Cursor>) -> Vec<u8> {
    const OPEN: &[u8] = b"{\"results\":[";
    results.splice(0..0, OPEN.iter().copied());
    end_page(&mut results, next_cursor);
    results
}

/// Closes a page's list and adds `"next_cursor"`.
fn end_page(buf: &mut Vec<u8>, next_cursor: Option<&Cursor>) {
    buf.extend_from_slice(b"],\"next_cursor\":");
    match next_cursor {
        Some(c) => push_str(buf, &c.encode()),
        None => buf.extend_from_slice(b"null"),
    }
    buf.push(b'}');
}

/// The ETag of an entry version.
pub fn etag(version: u64) -> HeaderValue {
    number_header(version, true)
}

thread_local! {
    /// Room for small header values: each is a slice of this buffer, so
    /// making one allocates only when the buffer is used up, where
    /// `HeaderValue::from_bytes` would allocate for every value.
    static HEADER_ROOM: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// Bytes the header buffer is refilled with.
const HEADER_ROOM_BYTES: usize = 4096;

/// A header value of `n` in decimal, in double quotes when `quoted` (an
/// entity tag). Runs on every entry response and for every request id.
pub fn number_header(n: u64, quoted: bool) -> HeaderValue {
    // `"` + up to 20 digits + `"`, formatted on the stack.
    let mut buf = [0u8; 22];
    let mut end = buf.len();
    if quoted {
        end -= 1;
        buf[end] = b'"';
    }
    let mut at = end;
    let mut rest = n;
    loop {
        at -= 1;
        // `rest % 10` is below 10, so the cast cannot truncate.
        buf[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if quoted {
        at -= 1;
        buf[at] = b'"';
    }
    let text = &buf[at..];
    let bytes = HEADER_ROOM.with(|room| {
        let mut room = room.borrow_mut();
        if room.capacity() - room.len() < text.len() {
            *room = BytesMut::with_capacity(HEADER_ROOM_BYTES);
        }
        room.extend_from_slice(text);
        room.split().freeze()
    });
    // Digits and quotes are always a valid header value.
    HeaderValue::from_maybe_shared(bytes).unwrap_or(HeaderValue::from_static("\"0\""))
}

/// Sets `ETag` on a response.
pub fn with_etag(mut resp: Response, version: u64) -> Response {
    resp.headers_mut().insert(header::ETAG, etag(version));
    resp
}

/// `X-Cache`: whether an entry answer came from memory.
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");

/// Sets `X-Cache` on a response.
pub fn with_cache(mut resp: Response, status: &'static str) -> Response {
    resp.headers_mut()
        .insert(X_CACHE.clone(), HeaderValue::from_static(status));
    resp
}

/// Sets `Last-Modified` from an entry's write time in Unix seconds (none
/// when the time is not known: 0).
pub fn with_last_modified(mut resp: Response, modified: u32) -> Response {
    if modified == 0 {
        return resp;
    }
    thread_local! {
        // The last date formatted on this thread: repeated reads of one
        // entry format it once.
        static LAST: RefCell<(u32, Option<HeaderValue>)> = const { RefCell::new((0, None)) };
    }
    let value = LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &last.1 {
            Some(v) if last.0 == modified => v.clone(),
            _ => {
                let at =
                    std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::from(modified));
                let v = HeaderValue::try_from(httpdate::fmt_http_date(at))
                    .unwrap_or_else(|_| HeaderValue::from_static("Thu, 01 Jan 1970 00:00:00 GMT"));
                *last = (modified, Some(v.clone()));
                v
            }
        }
    });
    resp.headers_mut().insert(header::LAST_MODIFIED, value);
    resp
}

/// Whether a read's conditions let it answer 304 for an entry at `version`
/// written at `modified`: `If-None-Match` when sent (it wins), else
/// `If-Modified-Since` when the entry's write time is known and not later.
pub fn not_modified(
    if_none: Option<&TagList>,
    if_modified_since: Option<u32>,
    version: u64,
    modified: u32,
) -> bool {
    match (if_none, if_modified_since) {
        (Some(tags), _) => tags.matches(version),
        (None, Some(since)) => modified != 0 && modified <= since,
        (None, None) => false,
    }
}

/// Sets `Cache-Control` on an entry answer: `max-age` of the whole seconds
/// of TTL left (rounded down) for an entry with a TTL, `no-cache` for one
/// without and for answers about no entry; `public` first when the table
/// lets shared caches keep its answers.
pub fn with_cache_control(mut resp: Response, ttl_ms: Option<u64>, public: bool) -> Response {
    let value = match (ttl_ms, public) {
        (None, false) => HeaderValue::from_static("no-cache"),
        (None, true) => HeaderValue::from_static("public, no-cache"),
        (Some(ms), public) => {
            let text = if public {
                format!("public, max-age={}", ms / 1000)
            } else {
                format!("max-age={}", ms / 1000)
            };
            // Digits and ASCII: always a valid value.
            HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("no-cache"))
        }
    };
    resp.headers_mut().insert(header::CACHE_CONTROL, value);
    resp
}

/// An `If-Match` / `If-None-Match` header's meaning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagList {
    /// `*`.
    Any,
    /// Entity tags; versions this server could have issued, others dropped.
    Versions(Vec<u64>),
}

impl TagList {
    /// Whether `version` is matched (weak comparison, as for GET).
    pub fn matches(&self, version: u64) -> bool {
        match self {
            TagList::Any => true,
            TagList::Versions(vs) => vs.contains(&version),
        }
    }
}

/// Parses a conditional header, if present.
///
/// # Errors
/// [`ApiError::InvalidArgument`] when the header is not `*` or a list of
/// quoted entity tags.
pub fn tag_list(
    headers: &HeaderMap,
    name: header::HeaderName,
) -> Result<Option<TagList>, ApiError> {
    let mut values = headers.get_all(&name).iter().peekable();
    if values.peek().is_none() {
        return Ok(None);
    }
    let bad = || ApiError::InvalidArgument(format!("{name} must be * or a list of quoted ETags"));
    let mut versions = Vec::new();
    for value in values {
        let text = value.to_str().map_err(|_| bad())?.trim();
        if text == "*" {
            return Ok(Some(TagList::Any));
        }
        for tag in text.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let tag = tag.strip_prefix("W/").unwrap_or(tag);
            let inner = tag
                .strip_prefix('"')
                .and_then(|t| t.strip_suffix('"'))
                .filter(|t| !t.contains('"'))
                .ok_or_else(bad)?;
            if let Ok(v) = inner.parse::<u64>() {
                versions.push(v);
            }
        }
    }
    Ok(Some(TagList::Versions(versions)))
}

/// The precondition a write carries in `If-Match` / `If-None-Match`.
///
/// # Errors
/// [`ApiError::InvalidArgument`] for malformed headers, for both at once, or
/// for `If-None-Match` with anything but `*`.
pub fn write_precondition(
    if_match: Option<TagList>,
    if_none: Option<TagList>,
) -> Result<Precondition, ApiError> {
    match (if_match, if_none) {
        (Some(_), Some(_)) => Err(ApiError::InvalidArgument(
            "send If-Match or If-None-Match, not both".into(),
        )),
        (None, None) => Ok(Precondition::None),
        (None, Some(TagList::Any)) => Ok(Precondition::Absent),
        (None, Some(TagList::Versions(_))) => Err(ApiError::InvalidArgument(
            "on writes If-None-Match supports only *".into(),
        )),
        (Some(TagList::Any), None) => Ok(Precondition::Exists),
        (Some(TagList::Versions(vs)), None) => Ok(Precondition::Version(vs)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_body_is_made_at_its_exact_length() {
        use crate::store::{Object, Value};
        let v = |t: &str| Value::parse(t.as_bytes()).unwrap();
        let one = |ttl_ms| Entry {
            objects: Objects::One(v(r#"{"a":[1,2],"b":"x"}"#)),
            version: 7,
            ttl_ms,
            modified: 0,
        };
        let many = Entry {
            objects: Objects::Many(Box::new(
                ["1", r#""two""#, "[3]"]
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Object {
                        seq: i as u64,
                        value: v(t),
                    })
                    .collect(),
            )),
            version: 7,
            ttl_ms: Some(0),
            modified: 0,
        };
        for (key, entry) in [
            ("k", one(None)),
            ("key-0001", one(Some(0))),
            ("", one(Some(9))),
            ("k", one(Some(10))),
            ("k", one(Some(u64::MAX))),
            ("bag", many),
        ] {
            let body = entry_body(key, &entry);
            assert_eq!(
                body.len(),
                body.capacity(),
                "{}",
                String::from_utf8_lossy(&body)
            );
            serde_json::from_slice::<serde_json::Value>(&body).unwrap();
        }
        // A key with escapes still makes valid JSON.
        let body = entry_body("a\"b\n", &one(None));
        let parsed: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(parsed["key"], "a\"b\n");
    }

    #[test]
    fn number_headers_are_their_decimal_digits() {
        for n in [0, 1, 9, 10, 12345, u64::MAX] {
            assert_eq!(number_header(n, false).to_str().unwrap(), n.to_string());
        }
        // Enough values to refill the buffer several times, each intact.
        let made: Vec<HeaderValue> = (0..5000u64).map(|n| number_header(n, n % 2 == 0)).collect();
        for (n, v) in (0..5000u64).zip(&made) {
            let want = if n % 2 == 0 {
                format!("\"{n}\"")
            } else {
                n.to_string()
            };
            assert_eq!(v.to_str().unwrap(), want);
        }
    }

    #[test]
    fn etags_are_quoted_decimal_versions() {
        for v in [0, 7, 42, 1_000_000, u64::MAX] {
            assert_eq!(etag(v).to_str().unwrap(), format!("\"{v}\""));
        }
    }

    fn headers(name: &'static str, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn parses_etag_lists() {
        let h = headers("if-match", r#""3", W/"7", "foreign""#);
        assert_eq!(
            tag_list(&h, header::IF_MATCH).unwrap(),
            Some(TagList::Versions(vec![3, 7]))
        );
        assert_eq!(
            tag_list(&headers("if-match", "*"), header::IF_MATCH).unwrap(),
            Some(TagList::Any)
        );
        assert!(tag_list(&headers("if-match", "3"), header::IF_MATCH).is_err());
        assert!(tag_list(&headers("if-match", "\"3"), header::IF_MATCH).is_err());
    }

    #[test]
    fn write_preconditions() {
        assert_eq!(
            write_precondition(
                None,
                tag_list(&headers("if-none-match", "*"), header::IF_NONE_MATCH).unwrap()
            )
            .unwrap(),
            Precondition::Absent
        );
        let tags = tag_list(&headers("if-none-match", "\"1\""), header::IF_NONE_MATCH).unwrap();
        assert!(write_precondition(None, tags).is_err());
        assert_eq!(write_precondition(None, None).unwrap(), Precondition::None);
    }
}
