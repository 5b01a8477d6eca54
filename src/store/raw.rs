//! Raw values: bytes that are not JSON, kept by a table created with
//! `"values": "any"`.
//!
//! A raw value is stored as the canonical JSON object
//! `{"$bytes":"<base64>","content_type":"…"}`. Every JSON view of a table
//! (scans, select, export, watch, transactions), the durable tier and
//! cluster rows then carry raw values unchanged and without a second
//! encoding; only an entry `PUT` (a body that is not JSON) and an entry
//! `GET` (answering the bytes as sent) translate.

use base64_simd::STANDARD;

use super::value::Value;

/// The member naming a raw value's bytes in its JSON form.
pub const BYTES_MEMBER: &str = "$bytes";
/// The member naming a raw value's content type in its JSON form.
pub const CONTENT_TYPE_MEMBER: &str = "content_type";
/// The type a raw value's JSON form gets when it names none.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";

const PREFIX: &[u8] = b"{\"$bytes\":\"";
const MIDDLE: &[u8] = b"\",\"content_type\":";

/// A stored raw value, seen in its JSON text.
#[derive(Debug)]
pub struct Raw<'a> {
    base64: &'a [u8],
    content_type: std::borrow::Cow<'a, str>,
}

impl Raw<'_> {
    /// The bytes, or `None` when the stored base64 is not valid (a JSON
    /// object of the same shape written to a `json` table).
    pub fn decode(&self) -> Option<Vec<u8>> {
        STANDARD.decode_to_vec(self.base64).ok()
    }

    /// The content type the bytes were written with.
    pub fn content_type(&self) -> &str {
        &self.content_type
    }
}

impl Value {
    /// The JSON form of raw `bytes` of type `content_type`.
    pub fn from_raw(bytes: &[u8], content_type: &str) -> Value {
        let encoded = STANDARD.encode_to_string(bytes);
        let mut text = Vec::with_capacity(encoded.len() + content_type.len() + 36);
        text.extend_from_slice(PREFIX);
        text.extend_from_slice(encoded.as_bytes());
        text.extend_from_slice(MIDDLE);
        // A `&str` always serializes.
        let quoted = serde_json::to_vec(content_type).unwrap_or_else(|_| b"\"\"".to_vec());
        text.extend_from_slice(&quoted);
        text.push(b'}');
        Value::from_canonical(&text)
    }

    /// This value as a raw value, when its text has exactly the raw shape.
    pub fn raw(&self) -> Option<Raw<'_>> {
        let text = self.as_bytes().strip_prefix(PREFIX)?;
        // From the end: the type is short and the base64 long. Inside a
        // JSON string every `"` is escaped, so the last `","content_type":`
        // is the separator.
        let end = text.windows(MIDDLE.len()).rposition(|w| w == MIDDLE)?;
        let (base64, rest) = text.split_at(end);
        let quoted = rest.strip_prefix(MIDDLE)?.strip_suffix(b"}")?;
        // Most types hold no escape: borrowed from the text as they are.
        let inner = quoted.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
        let content_type = match std::str::from_utf8(inner) {
            Ok(plain) if !inner.contains(&b'\\') && !inner.contains(&b'"') => {
                std::borrow::Cow::Borrowed(plain)
            }
            _ => std::borrow::Cow::Owned(serde_json::from_slice::<String>(quoted).ok()?),
        };
        Some(Raw {
            base64,
            content_type,
        })
    }
}

/// Checks a JSON value written to a `"values": "any"` table and gives the
/// form to store: an object with a `$bytes` member must be exactly
/// `{"$bytes": "<base64>", "content_type"?: "<type>"}` (the type defaults
/// to `application/octet-stream`); any other value is kept as it is.
///
/// # Errors
/// A message saying what is wrong with the raw form.
pub fn normalize(value: Value) -> Result<Value, String> {
    if !contains(value.as_bytes(), b"\"$bytes\"") {
        return Ok(value);
    }
    let serde_json::Value::Object(members) = value.to_json() else {
        return Ok(value);
    };
    let Some(bytes) = members.get(BYTES_MEMBER) else {
        return Ok(value);
    };
    if let Some(other) = members
        .keys()
        .find(|k| *k != BYTES_MEMBER && *k != CONTENT_TYPE_MEMBER)
    {
        return Err(format!(
            "a raw value has only \"$bytes\" and \"content_type\" members, not {other:?}"
        ));
    }
    let Some(bytes) = bytes.as_str() else {
        return Err("\"$bytes\" must be a base64 string".into());
    };
    let bytes = STANDARD
        .decode_to_vec(bytes)
        .map_err(|e| format!("\"$bytes\" is not valid base64: {e}"))?;
    let content_type = match members.get(CONTENT_TYPE_MEMBER) {
        None => DEFAULT_CONTENT_TYPE,
        Some(serde_json::Value::String(t)) => t.as_str(),
        Some(_) => return Err("\"content_type\" must be a string".into()),
    };
    check_content_type(content_type)?;
    Ok(Value::from_raw(&bytes, content_type))
}

/// Checks a content type given for raw bytes: a non-empty header value of
/// visible ASCII, at most 255 bytes.
///
/// # Errors
/// A message saying what is wrong.
pub fn check_content_type(content_type: &str) -> Result<(), String> {
    let visible = content_type
        .bytes()
        .all(|b| b == b' ' || b == b'\t' || b.is_ascii_graphic());
    if content_type.trim().is_empty() || content_type.len() > 255 || !visible {
        return Err("a content type is 1-255 bytes of visible ASCII".into());
    }
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_keep_every_byte_and_their_type() {
        let bytes = [0u8, 159, 146, 150, b'"', b'\\', 255, 10];
        let v = Value::from_raw(&bytes, "image/png; name=\"a b\"");
        // Already canonical: parsing the text again gives the same text.
        assert_eq!(Value::parse(v.as_bytes()).unwrap().as_bytes(), v.as_bytes());
        let raw = v.raw().unwrap();
        assert_eq!(raw.decode().unwrap(), bytes);
        assert_eq!(raw.content_type(), "image/png; name=\"a b\"");
        let empty = Value::from_raw(b"", "text/plain");
        assert_eq!(empty.raw().unwrap().decode().unwrap(), b"");
    }

    #[test]
    fn only_the_exact_shape_is_raw() {
        let v = |t: &str| Value::parse(t.as_bytes()).unwrap();
        assert!(v(r#"{"$bytes":"AA==","content_type":"x/y"}"#)
            .raw()
            .is_some());
        assert!(v(r#"{"$bytes":"AA=="}"#).raw().is_none());
        assert!(v(r#"{"$bytes":"AA==","content_type":"x/y","z":1}"#)
            .raw()
            .is_none());
        assert!(v(r#""$bytes""#).raw().is_none());
    }

    #[test]
    fn the_json_form_is_checked_and_completed() {
        let v = |t: &str| Value::parse(t.as_bytes()).unwrap();
        let done = normalize(v(r#"{"$bytes":"aGk="}"#)).unwrap();
        assert_eq!(done.raw().unwrap().content_type(), DEFAULT_CONTENT_TYPE);
        assert_eq!(done.raw().unwrap().decode().unwrap(), b"hi");
        assert!(normalize(v(r#"{"$bytes":"not base64!"}"#)).is_err());
        assert!(normalize(v(r#"{"$bytes":1}"#)).is_err());
        assert!(normalize(v(r#"{"$bytes":"aGk=","x":1}"#)).is_err());
        assert!(normalize(v(r#"{"$bytes":"aGk=","content_type":""}"#)).is_err());
        let plain = v(r#"{"bytes":"$bytes"}"#);
        assert_eq!(normalize(plain.clone()).unwrap(), plain);
        assert_eq!(normalize(v("[\"$bytes\"]")).unwrap(), v("[\"$bytes\"]"));
    }
}
