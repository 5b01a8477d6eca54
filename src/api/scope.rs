//! What a handler can learn of the request it serves besides the request
//! itself: its caller, its deadline, the pace of long work, and where its
//! response bytes are counted. The front sets the scope for each request;
//! handlers, extractors and responders below it read it.

use std::cell::Cell;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::auth::Principal;
use crate::api::error::ApiError;

/// What a handler can learn of the request it serves, besides the request.
pub(super) struct Scope {
    /// The caller, until a handler takes it.
    pub(super) caller: Cell<Option<Principal>>,
    /// When the request's time is up (`--request-timeout-ms` after it
    /// arrived).
    pub(super) deadline: Instant,
    /// When long work should stop to answer in time.
    pub(super) stop_at: Instant,
    /// Where response bodies are counted.
    pub(super) memory: Arc<crate::store::MemoryUse>,
}

tokio::task_local! {
    /// The request this task serves.
    pub(super) static SCOPE: Scope;
}

/// Takes the caller of the request being served: `None` outside a request,
/// when authentication failed on a route that does not need it, or when it
/// was already taken.
pub fn caller() -> Option<Principal> {
    SCOPE.try_with(|s| s.caller.take()).ok().flatten()
}

/// When the request being served must be answered: long work stops a
/// little before it with what it has and a cursor. `None` outside a
/// request.
pub fn deadline() -> Option<Instant> {
    SCOPE.try_with(|s| s.deadline).ok()
}

/// The pace of long work in the request being served: yield every few
/// milliseconds, stop early enough to answer before the deadline.
pub fn pace() -> crate::pace::Pace {
    crate::pace::Pace::new(SCOPE.try_with(|s| s.stop_at).ok())
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(_parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        // Taken, not cloned: a handler extracts its caller once, and a clone
        // is one more atomic pair on a name every request shares.
        caller().ok_or(ApiError::Unauthorized)
    }
}

/// Bodies at least this long are counted in the server's memory (kind
/// `responses`) until sent: pages of scans and selects, multi-gets, export
/// chunks. Shorter ones are bounded by the request count and not worth an
/// allocation and two atomic adds each.
const COUNTED_BODY_BYTES: usize = 16 * 1024;

/// A response body's bytes, counted in the server's memory (kind
/// `responses`) until the last reference to them is dropped, which is when
/// hyper has written them: the count follows the bytes themselves, not the
/// body that handed them over.
pub fn counted(body: Vec<u8>) -> bytes::Bytes {
    if body.len() < COUNTED_BODY_BYTES {
        return body.into();
    }
    match SCOPE.try_with(|s| s.memory.clone()) {
        Ok(memory) => counted_in(&memory, body),
        Err(_) => body.into(),
    }
}

/// [`counted`] in `memory`, outside a request's task (a streaming body).
pub fn counted_in(memory: &Arc<crate::store::MemoryUse>, body: Vec<u8>) -> bytes::Bytes {
    if body.len() < COUNTED_BODY_BYTES {
        return body.into();
    }
    let held = crate::store::Held::new(
        memory.clone(),
        crate::store::MemoryKind::Responses,
        body.len(),
    );
    bytes::Bytes::from_owner(CountedBytes { body, _held: held })
}

/// Bytes that give their count back when dropped.
struct CountedBytes {
    body: Vec<u8>,
    _held: crate::store::Held,
}

impl AsRef<[u8]> for CountedBytes {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}
