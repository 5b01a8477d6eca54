//! Raw values at the HTTP edge: which bodies are JSON, how raw bytes are
//! taken from a `PUT` and answered by a `GET` (see [`crate::store::raw`]
//! for how they are kept).

use axum::body::Body;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;

use super::error::{ApiError, ApiResult};
use crate::store::{raw, Entry, Objects, Txn, TxnOp, Value};

/// Whether a request body of this `Content-Type` is JSON: none at all,
/// `application/json`, any `application/*+json`, and
/// `application/x-www-form-urlencoded` (what `curl -d` sends), whatever
/// their parameters.
pub fn is_json_media(content_type: Option<&HeaderValue>) -> bool {
    let Some(value) = content_type else {
        return true;
    };
    let Ok(text) = value.to_str() else {
        return false;
    };
    let essence = text.split(';').next().unwrap_or("").trim();
    let eq = |s: &str| essence.eq_ignore_ascii_case(s);
    if eq("application/json") || eq("application/x-www-form-urlencoded") {
        return true;
    }
    let lower = essence.to_ascii_lowercase();
    lower.starts_with("application/") && lower.ends_with("+json")
}

/// The value an entry `PUT` stores. On a `json` table (`raw_values`
/// false) the body is JSON whatever its type; on an `any` table a body
/// that is not JSON is kept as bytes with its `Content-Type`, and a JSON
/// body in the raw form is checked.
///
/// # Errors
/// 400 `invalid_json` for JSON that does not parse, 400
/// `invalid_argument` for a bad raw form or content type.
pub fn body_value(
    raw_values: bool,
    content_type: Option<&HeaderValue>,
    body: &[u8],
) -> ApiResult<Value> {
    if !raw_values || is_json_media(content_type) {
        let value = Value::parse(body)
            .map_err(|e| ApiError::InvalidJson(format!("the body is not one JSON value: {e}")))?;
        return accept(raw_values, value);
    }
    let content_type = content_type
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::InvalidArgument("Content-Type must be visible ASCII".into()))?
        .trim();
    raw::check_content_type(content_type)
        .map_err(|m| ApiError::InvalidArgument(format!("Content-Type: {m}")))?;
    Ok(Value::from_raw(body, content_type))
}

/// A JSON value written to a table: on an `any` table, a value in the
/// raw form (`{"$bytes", "content_type"}`) is checked and completed.
///
/// # Errors
/// 400 `invalid_argument` for a bad raw form.
pub fn accept(raw_values: bool, value: Value) -> ApiResult<Value> {
    if !raw_values {
        return Ok(value);
    }
    raw::normalize(value).map_err(ApiError::InvalidArgument)
}

/// [`accept`] for every value a transaction writes or compares.
///
/// # Errors
/// 400 naming the part at fault.
pub fn accept_txn(raw_values: bool, txn: &mut Txn) -> ApiResult<()> {
    if !raw_values {
        return Ok(());
    }
    let named =
        |at: String| move |e: ApiError| ApiError::InvalidArgument(format!("{at}: {}", e.message()));
    for (i, c) in txn.compare.iter_mut().enumerate() {
        if let crate::store::Test::Value(v) = &mut c.test {
            *v = accept(true, v.clone()).map_err(named(format!("if[{i}]")))?;
        }
    }
    for (branch, ops) in [("then", &mut txn.then), ("else", &mut txn.otherwise)] {
        for (i, op) in ops.iter_mut().enumerate() {
            if let TxnOp::Put { value, .. }
            | TxnOp::InsertNew { value, .. }
            | TxnOp::DeleteObject { value, .. } = op
            {
                *value = accept(true, value.clone()).map_err(named(format!("{branch}[{i}]")))?;
            }
        }
    }
    Ok(())
}

/// The body of an entry `GET` on an `any` table whose value is raw: the
/// bytes and their content type. `None` for JSON values.
pub fn raw_answer(raw_values: bool, entry: &Entry) -> Option<Response> {
    if !raw_values {
        return None;
    }
    let Objects::One(value) = &entry.objects else {
        return None;
    };
    let stored = value.raw()?;
    let bytes = stored.decode()?;
    let content_type = HeaderValue::from_str(stored.content_type())
        .unwrap_or_else(|_| HeaderValue::from_static(raw::DEFAULT_CONTENT_TYPE));
    let mut resp = Response::new(Body::from(super::scope::counted(bytes)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    Some(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types_are_told_apart() {
        let h = |s: &str| HeaderValue::from_str(s).unwrap();
        assert!(is_json_media(None));
        for json in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/problem+json",
            "application/x-www-form-urlencoded",
        ] {
            assert!(is_json_media(Some(&h(json))), "{json}");
        }
        for other in [
            "text/plain",
            "text/plain;charset=UTF-8",
            "image/png",
            "application/octet-stream",
            "application/jsonx",
            "text/json+x",
        ] {
            assert!(!is_json_media(Some(&h(other))), "{other}");
        }
    }
}
