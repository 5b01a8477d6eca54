//! Extractors that turn every malformed request into our JSON error shape.
//!
//! Bodies are read as bytes and parsed as JSON whatever their Content-Type,
//! so `curl -d` works. Path segments and query strings go through axum's
//! parsers with their rejections mapped to `invalid_name`, `invalid_key` or
//! `invalid_argument`.

use axum::extract::rejection::{QueryRejection, RawPathParamsRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, RawPathParams, Request};
use axum::http::header;
use axum::http::request::Parts;
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::respond::{tag_list, write_precondition, TagList};
use super::AppState;
use crate::error::ApiError;
use crate::store::{validate_key, validate_table_name, Precondition};

/// A JSON body of type `T`, parsed whatever the Content-Type says.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// The raw body bytes, with the size limit mapped to 413.
#[derive(Debug)]
pub struct RawBody(pub Bytes);

impl FromRequest<AppState> for RawBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let limit = state.limits.max_body_bytes;
        match axum::body::to_bytes(req.into_body(), limit).await {
            Ok(bytes) => Ok(RawBody(bytes)),
            Err(e) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|cause| cause.is::<http_body_util::LengthLimitError>());
                Err(if too_large {
                    ApiError::PayloadTooLarge(limit)
                } else {
                    ApiError::InvalidArgument(format!("could not read the body: {e}"))
                })
            }
        }
    }
}

/// Parses JSON text into `T`, telling syntax errors (`invalid_json`) from
/// well-formed JSON of the wrong shape (`invalid_argument`).
///
/// # Errors
/// [`ApiError::InvalidJson`] or [`ApiError::InvalidArgument`].
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        if e.classify() != serde_json::error::Category::Data {
            return ApiError::InvalidJson(e.to_string());
        }
        // serde reports a type mismatch as soon as it sees one, even when the
        // text goes on to be malformed: check the syntax before blaming shape.
        match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Err(syntax) => ApiError::InvalidJson(syntax.to_string()),
            Ok(_) => ApiError::InvalidArgument(e.to_string()),
        }
    })
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
pub fn parse_object<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
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
pub struct TablePath(pub String);

/// `{table}` and `{key}` from the path, both checked.
#[derive(Debug)]
pub struct EntryPath(pub String, pub String);

/// Whether a raw path segment has a `%` not followed by two hex digits.
fn malformed_escape(segment: &str) -> bool {
    let b = segment.as_bytes();
    b.iter().enumerate().any(|(i, &c)| {
        c == b'%'
            && !(b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

/// Rejects malformed percent-escapes in the table (3rd) and key (5th)
/// segments of `/v1/tables/{table}/entries/{key}…`, which would otherwise be
/// taken literally.
fn check_escapes(parts: &Parts) -> Result<(), ApiError> {
    for (i, segment) in parts.uri.path().split('/').enumerate() {
        if !malformed_escape(segment) {
            continue;
        }
        return Err(match i {
            3 => ApiError::InvalidName("table name has a malformed percent-escape".into()),
            _ => ApiError::InvalidKey("key has a malformed percent-escape".into()),
        });
    }
    Ok(())
}

/// The route's captures, percent-decoded, without deserializing them into
/// a map (this runs on every entry request).
async fn path_params<S: Send + Sync>(
    parts: &mut Parts,
    state: &S,
) -> Result<RawPathParams, ApiError> {
    check_escapes(parts)?;
    RawPathParams::from_request_parts(parts, state)
        .await
        .map_err(|e| match e {
            RawPathParamsRejection::InvalidUtf8InPathParam(inner) => {
                let text = inner.body_text();
                if text.contains("`key`") {
                    ApiError::InvalidKey(format!("key is not valid percent-encoded UTF-8: {text}"))
                } else {
                    ApiError::InvalidName(format!(
                        "table name is not valid percent-encoded UTF-8: {text}"
                    ))
                }
            }
            other => ApiError::Internal(format!("path extraction: {other}")),
        })
}

fn param(params: &RawPathParams, name: &str) -> Result<String, ApiError> {
    params
        .iter()
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_owned())
        .ok_or_else(|| ApiError::Internal(format!("route lacks the {name} parameter")))
}

fn checked_table(name: String) -> Result<String, ApiError> {
    validate_table_name(&name).map_err(|e| ApiError::InvalidName(e.to_string()))?;
    Ok(name)
}

/// Checks a key from a path, query or body.
///
/// # Errors
/// [`ApiError::InvalidKey`].
pub fn checked_key(key: String) -> Result<String, ApiError> {
    validate_key(&key).map_err(|e| ApiError::InvalidKey(e.to_string()))?;
    Ok(key)
}

impl<S: Send + Sync> FromRequestParts<S> for TablePath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = path_params(parts, state).await?;
        Ok(TablePath(checked_table(param(&params, "table")?)?))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for EntryPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = path_params(parts, state).await?;
        let table = checked_table(param(&params, "table")?)?;
        let key = checked_key(param(&params, "key")?)?;
        Ok(EntryPath(table, key))
    }
}

/// The conditional-request headers of an entry request, read from the
/// request itself rather than from a copy of its header map (taking
/// `HeaderMap` as an extractor clones every header, on every request).
/// Each parse result is kept, so a malformed header is reported by the
/// handler where it looks, after the table is found.
#[derive(Debug)]
pub struct Conditions {
    /// `If-Match`, if sent.
    pub if_match: Result<Option<TagList>, ApiError>,
    /// `If-None-Match`, if sent.
    pub if_none_match: Result<Option<TagList>, ApiError>,
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
        Ok(Conditions {
            if_match: tag_list(&parts.headers, header::IF_MATCH),
            if_none_match: tag_list(&parts.headers, header::IF_NONE_MATCH),
        })
    }
}
