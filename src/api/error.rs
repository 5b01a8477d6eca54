//! [`ApiError`]: the only type that becomes an HTTP error response.
//!
//! Every error leaves as `{"error":{"code":"snake_case","message":"…"}}` with
//! a status from the API contract. Codes are stable identifiers clients may
//! match on; messages are for people. Building a response has no side
//! effects: logging happens in the request span's middleware.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::ops::OpError;
use crate::store::StoreError;

/// An error as the client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// 400 `invalid_json`: the body is not JSON.
    InvalidJson(String),
    /// 400 `invalid_name`: a table name breaks the naming rules.
    InvalidName(String),
    /// 400 `invalid_key`: a key is empty, too long, not UTF-8 or has NUL.
    InvalidKey(String),
    /// 400 `invalid_argument`: a parameter or body field is wrong.
    InvalidArgument(String),
    /// 400 `invalid_import`: an import stream is malformed, truncated or
    /// altered; the message starts with `line N:`.
    InvalidImport(String),
    /// 400 `invalid_match_spec`: a select's specification is malformed; the
    /// message names the offending part.
    InvalidMatchSpec(String),
    /// 401 `unauthorized`: no token, or one we do not know.
    Unauthorized,
    /// 403 `forbidden`: the principal may not do this to this table.
    Forbidden(String),
    /// 404 `table_not_found`.
    TableNotFound(String),
    /// 404 `key_not_found`.
    KeyNotFound,
    /// 404 `not_found`: no such route.
    RouteNotFound,
    /// 405 `method_not_allowed`.
    MethodNotAllowed,
    /// 408 `request_timeout`: the request's body did not arrive before its
    /// deadline; nothing was applied.
    RequestTimeout,
    /// 409 `table_exists`.
    TableExists(String),
    /// 409 `not_a_counter`.
    NotACounter(String),
    /// 409 `not_an_object`: merge patch on a value that is not an object.
    NotAnObject,
    /// 409 `wrong_table_type`.
    WrongTableType(String),
    /// 409 `overflow`: a counter would leave the i64 range.
    Overflow,
    /// 422 `result_too_large`: one select or scan result alone is over
    /// `--max-response-bytes` (or a multi-get's answer is); the error names
    /// the key and carries the cursor that continues past it.
    ResultTooLarge {
        /// The key whose result is too large.
        key: String,
        /// Where to continue after it (`None`: it was the last).
        next_cursor: Option<String>,
        /// The limit, in bytes.
        limit: usize,
    },
    /// 409 `txn_aborted`: an operation of a transaction failed, so none was
    /// applied; names the operation and carries its own error code.
    TxnAborted {
        /// The failed operation's 0-based index in its branch.
        op: usize,
        /// The operation's own error code.
        cause: &'static str,
        /// The operation's own error message.
        message: String,
    },
    /// 409 `idempotency_in_flight`: a retry while the first request with
    /// its `Idempotency-Key` is still running.
    IdempotencyInFlight,
    /// 422 `idempotency_key_reused`: the key was used for another request.
    IdempotencyKeyReused,
    /// 412 `precondition_failed`.
    PreconditionFailed(String),
    /// 413 `payload_too_large`.
    PayloadTooLarge(usize),
    /// 429 `rate_limited`: the caller is past its rate limit.
    RateLimited(super::rate::RateState, u64),
    /// 502 `origin_error`.
    OriginError(String),
    /// 504 `origin_timeout`.
    OriginTimeout,
    /// 503 `origin_unavailable`: the origin's breaker is open.
    OriginUnavailable(String),
    /// 503 `unavailable`: starting, stopping, or shedding load.
    Unavailable(String),
    /// 507 `table_full`.
    TableFull(u64),
    /// 507 `memory_limit`.
    MemoryLimit,
    /// 507 `storage_full`: the data directory's disk is full; the write was
    /// not applied (or was undone).
    StorageFull,
    /// 507 `table_limit`: the server holds `--max-tables` tables.
    TableLimit(usize),
    /// 500 `internal`: a bug or an I/O failure; details go to the log only.
    Internal(String),
}

/// The JSON error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable snake_case identifier, e.g. `key_not_found`.
    #[schema(example = "key_not_found")]
    pub code: String,
    /// Human-readable explanation.
    #[schema(example = "key not found")]
    pub message: String,
    /// `result_too_large` only: the key whose result is over the limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// `result_too_large` only: the cursor that continues past that key
    /// (null when it was the last).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub next_cursor: Option<Option<String>>,
    /// `txn_aborted` only: the 0-based index of the operation that failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<usize>,
    /// `txn_aborted` only: that operation's own error code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            InvalidJson(_) | InvalidName(_) | InvalidKey(_) | InvalidArgument(_)
            | InvalidMatchSpec(_) | InvalidImport(_) => StatusCode::BAD_REQUEST,
            Unauthorized => StatusCode::UNAUTHORIZED,
            Forbidden(_) => StatusCode::FORBIDDEN,
            TableNotFound(_) | KeyNotFound | RouteNotFound => StatusCode::NOT_FOUND,
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            TableExists(_)
            | NotACounter(_)
            | NotAnObject
            | WrongTableType(_)
            | Overflow
            | IdempotencyInFlight
            | TxnAborted { .. } => StatusCode::CONFLICT,
            IdempotencyKeyReused | ResultTooLarge { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            PreconditionFailed(_) => StatusCode::PRECONDITION_FAILED,
            PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            RateLimited(..) => StatusCode::TOO_MANY_REQUESTS,
            OriginError(_) => StatusCode::BAD_GATEWAY,
            OriginTimeout => StatusCode::GATEWAY_TIMEOUT,
            OriginUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            TableFull(_) | MemoryLimit | TableLimit(_) | StorageFull => {
                StatusCode::INSUFFICIENT_STORAGE
            }
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable error code.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            InvalidJson(_) => "invalid_json",
            InvalidName(_) => "invalid_name",
            InvalidKey(_) => "invalid_key",
            InvalidArgument(_) => "invalid_argument",
            InvalidMatchSpec(_) => "invalid_match_spec",
            InvalidImport(_) => "invalid_import",
            Unauthorized => "unauthorized",
            Forbidden(_) => "forbidden",
            TableNotFound(_) => "table_not_found",
            KeyNotFound => "key_not_found",
            RouteNotFound => "not_found",
            MethodNotAllowed => "method_not_allowed",
            RequestTimeout => "request_timeout",
            TableExists(_) => "table_exists",
            NotACounter(_) => "not_a_counter",
            NotAnObject => "not_an_object",
            WrongTableType(_) => "wrong_table_type",
            Overflow => "overflow",
            IdempotencyInFlight => "idempotency_in_flight",
            TxnAborted { .. } => "txn_aborted",
            IdempotencyKeyReused => "idempotency_key_reused",
            ResultTooLarge { .. } => "result_too_large",
            PreconditionFailed(_) => "precondition_failed",
            PayloadTooLarge(_) => "payload_too_large",
            RateLimited(..) => "rate_limited",
            OriginError(_) => "origin_error",
            OriginTimeout => "origin_timeout",
            OriginUnavailable(_) => "origin_unavailable",
            Unavailable(_) => "unavailable",
            TableFull(_) => "table_full",
            MemoryLimit => "memory_limit",
            StorageFull => "storage_full",
            TableLimit(_) => "table_limit",
            Internal(_) => "internal",
        }
    }

    /// The message shown to the client.
    pub fn message(&self) -> String {
        use ApiError::*;
        match self {
            InvalidJson(m) | InvalidName(m) | InvalidKey(m) | InvalidArgument(m)
            | InvalidMatchSpec(m) | InvalidImport(m) => m.clone(),
            Unauthorized => "a valid bearer token is required".into(),
            Forbidden(m) => m.clone(),
            TableNotFound(t) => format!("table '{t}' does not exist"),
            KeyNotFound => "key not found".into(),
            RouteNotFound => "no such route".into(),
            MethodNotAllowed => "method not allowed on this route".into(),
            RequestTimeout => {
                "the request body did not arrive in time; nothing was applied".into()
            }
            TableExists(t) => format!("table '{t}' already exists"),
            NotACounter(m) => m.clone(),
            NotAnObject => "the stored value is not a JSON object".into(),
            WrongTableType(m) => m.clone(),
            Overflow => "counter update overflows a 64-bit integer".into(),
            TxnAborted { op, cause, message } => format!(
                "operation {op} of the transaction failed ({cause}: {message}); nothing was applied"
            ),
            IdempotencyInFlight => {
                "the first request with this Idempotency-Key is still running; retry shortly".into()
            }
            IdempotencyKeyReused => {
                "this Idempotency-Key was used for a different request (method, path or body)"
                    .into()
            }
            ResultTooLarge {
                key,
                limit,
                next_cursor,
            } => format!(
                "the answer would pass the {limit}-byte limit (--max-response-bytes) at key {key:?}{}",
                if next_cursor.is_some() {
                    "; continue after it with next_cursor"
                } else {
                    ""
                }
            ),
            PreconditionFailed(m) => m.clone(),
            PayloadTooLarge(n) => format!("request body exceeds {n} bytes"),
            RateLimited(state, retry) => format!(
                "past the rate limit (bursts of {}); retry in {retry} s",
                state.limit
            ),
            OriginError(m) => format!("origin failed: {m}"),
            OriginTimeout => "origin did not answer in time".into(),
            OriginUnavailable(origin) => format!(
                "origin {origin} failed repeatedly and is not called for now; retry later"
            ),
            Unavailable(m) => m.clone(),
            TableFull(n) => format!("table is full ({n} entries) and does not evict"),
            MemoryLimit => "server memory limit reached".into(),
            StorageFull => {
                "the disk of the data directory is full; the write was not applied".into()
            }
            TableLimit(n) => format!("the server already holds its limit of {n} tables"),
            // Internal details go to the log, never to the client.
            Internal(_) => "internal error".into(),
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

impl std::error::Error for ApiError {}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::TableNotFound(t) => ApiError::TableNotFound(t),
            StoreError::TableExists(t) => ApiError::TableExists(t),
            StoreError::KeyNotFound => ApiError::KeyNotFound,
            StoreError::PreconditionFailed(m) => ApiError::PreconditionFailed(m.into()),
            StoreError::NotACounter(m) => ApiError::NotACounter(m),
            StoreError::NotAnObject => ApiError::NotAnObject,
            StoreError::WrongTableType(m) => ApiError::WrongTableType(m.into()),
            StoreError::Overflow => ApiError::Overflow,
            StoreError::TableFull(n) => ApiError::TableFull(n),
            StoreError::MemoryLimit => ApiError::MemoryLimit,
            StoreError::InvalidArgument(m) => ApiError::InvalidArgument(m),
            StoreError::TableLimit(n) => ApiError::TableLimit(n),
            StoreError::TxnAborted { op, cause } => ApiError::aborted(op, (*cause).into()),
            StoreError::ResultTooLarge { key, limit } => ApiError::ResultTooLarge {
                key,
                next_cursor: None,
                limit,
            },
        }
    }
}

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        match e {
            OpError::Store(e) => e.into(),
            OpError::TableNotFound(t) => ApiError::TableNotFound(t),
            OpError::TableExists(t) => ApiError::TableExists(t),
            OpError::InvalidArgument(m) => ApiError::InvalidArgument(m),
            OpError::TableFull(n) => ApiError::TableFull(n),
            OpError::IdempotencyInFlight => ApiError::IdempotencyInFlight,
            OpError::ResultTooLarge {
                key,
                next_cursor,
                limit,
            } => ApiError::ResultTooLarge {
                key,
                next_cursor,
                limit,
            },
            OpError::Unavailable(m) => ApiError::Unavailable(m),
            OpError::StorageFull => ApiError::StorageFull,
            e @ OpError::NotDurable { .. } => ApiError::Unavailable(e.to_string()),
            OpError::Internal(m) => ApiError::Internal(m),
            OpError::TxnAborted { op, cause } => ApiError::aborted(op, (*cause).into()),
        }
    }
}

impl ApiError {
    /// A transaction's operation `op` failed with `cause`. Failures that
    /// are not the operation's own (the durable tier, the cluster) stay
    /// what they are: nothing was applied, and the retry may succeed.
    fn aborted(op: usize, cause: ApiError) -> ApiError {
        match cause {
            ApiError::Unavailable(_)
            | ApiError::StorageFull
            | ApiError::Internal(_)
            | ApiError::ResultTooLarge { .. } => cause,
            cause => ApiError::TxnAborted {
                op,
                cause: cause.code(),
                message: cause.message(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::RateLimited(state, retry) = &self {
            return rate_limited(state, *retry);
        }
        let (op, cause) = match &self {
            ApiError::TxnAborted { op, cause, .. } => (Some(*op), Some((*cause).to_owned())),
            _ => (None, None),
        };
        let (key, next_cursor) = match &self {
            ApiError::ResultTooLarge {
                key, next_cursor, ..
            } => (Some(key.clone()), Some(next_cursor.clone())),
            _ => (None, None),
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code().to_owned(),
                message: self.message(),
                key,
                next_cursor,
                op,
                cause,
            },
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let mut resp = (self.status(), bytes).into_response();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let ApiError::Internal(detail) = &self {
            // Carried to the logging middleware, which records it in the
            // request span; the client only sees "internal error".
            resp.extensions_mut().insert(InternalDetail(detail.clone()));
        }
        if matches!(
            self,
            ApiError::Unavailable(_) | ApiError::OriginUnavailable(_)
        ) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::Unauthorized) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

/// A 429: built apart from the other errors, since refusing is all a
/// flood past the limit gets and must cost little. Each worker thread
/// keeps the last refusal it built (body and headers, which depend only on
/// the burst, the reset and the wait) and answers a flood with copies.
fn rate_limited(state: &super::rate::RateState, retry: u64) -> Response {
    use axum::http::HeaderMap;
    thread_local! {
        static LAST: std::cell::RefCell<Option<(super::rate::RateState, u64, bytes::Bytes, HeaderMap)>> =
            const { std::cell::RefCell::new(None) };
    }
    let build = || {
        let limit = state.limit;
        let body = bytes::Bytes::from(format!(
            r#"{{"error":{{"code":"rate_limited","message":"past the rate limit (bursts of {limit}); retry in {retry} s"}}}}"#
        ));
        let mut h = HeaderMap::with_capacity(6);
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::RETRY_AFTER, super::rate::number(retry));
        state.write_headers(&mut h);
        (body, h)
    };
    let (body, headers) = LAST.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return build();
        };
        match &*last {
            Some((s, r, body, h)) if s == state && *r == retry => (body.clone(), h.clone()),
            _ => {
                let (body, h) = build();
                *last = Some((*state, retry, body.clone(), h.clone()));
                (body, h)
            }
        }
    });
    let mut resp = Response::new(axum::body::Body::from(body));
    *resp.status_mut() = StatusCode::TOO_MANY_REQUESTS;
    *resp.headers_mut() = headers;
    resp
}

/// The hidden detail of a 500, for the log.
#[derive(Debug, Clone)]
pub struct InternalDetail(pub String);

/// Shorthand for handler results.
pub type ApiResult<T> = Result<T, ApiError>;
