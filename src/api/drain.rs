//! Keeps keep-alive connections usable when a request is answered before
//! its body is read.
//!
//! Many answers come before the body is looked at: 401 from authentication,
//! 404/405 from routing, 403 from a handler, 413 part-way through a body,
//! 503 from load shedding, or a handler that takes no body at all. If the
//! unread bytes are simply dropped, hyper may close the connection under a
//! client that is already sending its next request, and a pooled client sees
//! a reset. [`watch`] keeps the unread remainder of every request body;
//! once the response is ready [`finish`] reads and discards up to a bound,
//! and when the remainder is larger (or arrives too slowly) it marks the
//! response `Connection: close`, so the client is told before the
//! connection goes. Both run in [`super::front`].
//!
//! Requests without a body pass straight through, untouched.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::BodyExt;

/// Longest a leftover body is read before the connection is closed instead:
/// long enough for any client that sends at network speed, short enough
/// that a slow sender cannot hold a task.
const DRAIN_DEADLINE: Duration = Duration::from_secs(1);

/// What a watched body shares with the front service.
#[derive(Debug, Default)]
struct Shared {
    /// Where the body is put back when dropped before its end.
    leftover: Mutex<Option<Body>>,
    /// The whole body has been read.
    complete: AtomicBool,
}

/// A request whose body is being watched for a remainder left unread.
#[derive(Debug)]
pub struct Watched {
    shared: Arc<Shared>,
    declared: Option<u64>,
}

impl Watched {
    /// The `Content-Length` the request declared, if any.
    pub fn declared(&self) -> Option<u64> {
        self.declared
    }

    /// A view of how far the body has been read.
    pub fn progress(&self) -> Progress {
        Progress(self.shared.clone())
    }
}

/// Whether a request's body has been read to its end.
#[derive(Debug, Clone)]
pub struct Progress(Arc<Shared>);

impl Progress {
    /// The whole body has been read.
    pub fn complete(&self) -> bool {
        self.0.complete.load(Ordering::Acquire)
    }
}

/// Lets `req` through unchanged when it has no body; otherwise swaps its
/// body for one that keeps any unread remainder, and returns what
/// [`finish`] needs to deal with that remainder.
pub fn watch(req: Request) -> (Request, Option<Watched>) {
    use http_body::Body as _;
    if req.body().is_end_stream() {
        return (req, None);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let shared: Arc<Shared> = Arc::default();
    let (parts, body) = req.into_parts();
    let tracked = Body::new(Tracked {
        inner: Some(body),
        shared: shared.clone(),
    });
    (
        Request::from_parts(parts, tracked),
        Some(Watched { shared, declared }),
    )
}

/// Once the answer is ready: reads and discards what the handler left of
/// the body, up to `limit` bytes, or marks the answer `Connection: close`
/// when the remainder is larger or arrives too slowly.
pub async fn finish(watched: Watched, resp: &mut Response, limit: usize) {
    let rest = watched
        .shared
        .leftover
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .take();
    let closing = resp
        .headers()
        .get(header::CONNECTION)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
    if let Some(rest) = rest.filter(|_| !closing) {
        let too_big = watched.declared.is_some_and(|n| n > 2 * limit as u64);
        if too_big || !drain(rest, limit).await {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
    }
}

/// Reads and discards `body` to its end; false if it holds more than
/// `limit` bytes, fails, or takes longer than [`DRAIN_DEADLINE`].
async fn drain(mut body: Body, limit: usize) -> bool {
    let read = async {
        let mut seen = 0usize;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else {
                return false;
            };
            if let Some(data) = frame.data_ref() {
                seen += data.len();
                if seen > limit {
                    return false;
                }
            }
        }
        true
    };
    tokio::time::timeout(DRAIN_DEADLINE, read)
        .await
        .unwrap_or(false)
}

/// A request body that, when dropped before its end, hands what is left to
/// [`finish`] instead of discarding it.
struct Tracked {
    inner: Option<Body>,
    shared: Arc<Shared>,
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                self.shared.complete.store(true, Ordering::Release);
                self.inner = None;
            }
            // Broken: the connection is gone.
            Poll::Ready(Some(Err(_))) => self.inner = None,
            // A body of known length says it is complete once its last
            // bytes are out, without a final poll.
            Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => {
                self.shared.complete.store(true, Ordering::Release);
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| http_body::SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        use http_body::Body as _;
        if let Some(rest) = self.inner.take() {
            if !rest.is_end_stream() {
                *self
                    .shared
                    .leftover
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(rest);
            }
        }
    }
}
