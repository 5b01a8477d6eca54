//! `GET /v1/tables/{t}/watch`: a table's changes as Server-Sent Events.
//!
//! The handler registers the watch before it answers, so every change
//! applied after the response headers is delivered. The stream then reads
//! the table's history at the client's pace: each change is encoded once
//! and shared by every stream that sends it; a stream that falls behind the
//! history gets `lagged` and ends; an idle one sends a comment at least
//! every heartbeat interval.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use super::direct::ApiRoutes;
use crate::api_routes;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::Response;
use serde::Deserialize;
use tokio::time::Instant;
use utoipa::IntoParams;

use super::auth::{authorize, Op, Principal};
use super::extract::{checked_key, QueryParams, TablePath};
use super::respond::push_str;
use super::AppState;
use crate::api::error::{ApiError, ApiResult, ErrorBody};
use crate::ops::TableOps;
use crate::store::{Change, ChangeKind, Read, Watcher};

/// Routes for change streams.
pub fn router() -> ApiRoutes {
    ApiRoutes::new().routes(api_routes!(watch))
}

/// Changes one read of the history takes at most; bounds what a stream
/// holds besides its position.
const BATCH: usize = 256;

/// Least time between two sends of one stream while changes keep coming:
/// one write to the socket then carries every change of that moment, so a
/// hundred watchers cost the writers little more than one.
const LINGER: Duration = Duration::from_millis(5);

/// The comment sent when nothing else was sent for a heartbeat interval.
const HEARTBEAT: &[u8] = b": keep-alive\n\n";

/// The event that ends a stream that fell behind.
const LAGGED: &[u8] = b"event: lagged\ndata: {}\n\n";

/// The event that ends a stream whose principal may no longer read the
/// table.
const REVOKED: &[u8] = b"event: revoked\ndata: {}\n\n";

/// Most bytes of events in one chunk of a stream (a single larger event
/// goes alone): bounds what each stream copies at a time.
const CHUNK_BYTES: usize = 256 * 1024;

/// How often a stream checks that its principal may still read the table
/// (a give-away can take a private table from it).
const ACCESS_CHECK: Duration = Duration::from_millis(250);

/// Query of a watch.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct WatchParams {
    /// Only this key's changes (and table-wide events).
    pub key: Option<String>,
    /// Only changes of keys starting with this (and table-wide events).
    pub prefix: Option<String>,
    /// Replay every change after this revision first. `Last-Event-ID`
    /// wins when both are given.
    pub since: Option<u64>,
}

/// Which changes a stream sends.
#[derive(Debug)]
enum Filter {
    All,
    Key(String),
    Prefix(String),
}

impl Filter {
    fn admits(&self, change: &Change) -> bool {
        let Some(key) = &change.key else {
            return true;
        };
        match self {
            Filter::All => true,
            Filter::Key(k) => key.as_str() == k,
            Filter::Prefix(p) => key.starts_with(p.as_str()),
        }
    }
}

/// Watch a table's changes (Server-Sent Events)
///
/// Each change to a matching key is one event, in the order the changes
/// were applied: `put` (`{"key","value","revision"}`; bag types give the
/// added value), `delete`, `expire`, `evict` (`{"key","revision"}`; a
/// `delete` of one bag value adds `"value"`), and `clear` and `drop`
/// (`{"revision"}`, sent to every watch of the table whatever its
/// filter; the stream ends after `drop`). `take`, `delete_object` and
/// counters send `put` or `delete` as their effect is; a change that
/// changes nothing sends nothing. `id:` is the change's revision, the
/// version its write's `ETag` carries, and increases strictly within a
/// stream.
///
/// Resume with `Last-Event-ID` (or `since=`): every change after that
/// revision is replayed from the table's history (`--watch-history`
/// changes, and at most `--watch-history-bytes`). A table keeps a history
/// while it is watched and for `--watch-history-retention-ms` (60 s) after
/// its last watcher left (a watcher leaves when its connection closes);
/// then the history is freed and a watch after that starts a new one. The
/// history counts toward `--max-memory-bytes`. When it no longer reaches back that far
/// (or the revision is ahead of the table), the first event is `reset`
/// with the current revision: re-read the table with a scan, then follow
/// the live changes. A stream that falls behind by more than the history
/// gets `event: lagged` (`{}`, no id) and ends; a connection that takes
/// no bytes for `--write-stall-ms` is closed. A `:` comment is sent when
/// nothing else was for `--watch-heartbeat-ms` (15 s). While changes keep
/// coming, a stream sends at most every 5 ms, with everything since. Needs
/// read access, re-checked while the stream runs: when its principal loses
/// it (a `give_away` of a private table), or when the token it was opened
/// with is removed from the tokens file and `SIGHUP` reloads it, the stream
/// sends `event: revoked` (`{}`, no id) within a second and ends. On cluster tables a watch on any node gets the changes of
/// every node from the change log, in revision order, a few poll intervals
/// after their commit; each node keeps its own history, and a node answers
/// 503 until it has read the log far enough to start a watch.
#[utoipa::path(
    get,
    path = "/v1/tables/{table}/watch",
    tag = "watch",
    params(("table" = String, Path, description = "Table name"), WatchParams,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this revision")),
    responses(
        (status = 200, description = "The change stream", content_type = "text/event-stream", body = String,
         example = json!("id: 1042\nevent: put\ndata: {\"key\":\"alice\",\"value\":{\"n\":2},\"revision\":1042}\n\n")),
        (status = 400, description = "A bad key, both key and prefix, or a bad revision", body = ErrorBody),
        (status = 403, description = "Not allowed to read the table", body = ErrorBody),
        (status = 404, description = "No such table", body = ErrorBody),
    )
)]
pub async fn watch(
    State(state): State<AppState>,
    who: Principal,
    TablePath(name): TablePath,
    QueryParams(params): QueryParams<WatchParams>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let filter = match (params.key, params.prefix) {
        (Some(_), Some(_)) => {
            return Err(ApiError::InvalidArgument(
                "give key or prefix, not both".into(),
            ))
        }
        (Some(key), None) => Filter::Key(checked_key(key)?),
        (None, Some(prefix)) if !prefix.is_empty() => Filter::Prefix(prefix),
        (None, _) => Filter::All,
    };
    let since = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::InvalidArgument("Last-Event-ID must be a revision number".into())
                })?,
        ),
        None => params.since,
    };
    let table = state.table_for(&name, &who, Op::Read).await?;
    let start = state.tables.watch(&table, since)?;
    let feed = Feed {
        watcher: start.watcher,
        filter,
        first: start.reset.map(reset_frame),
        heartbeat: state.limits.watch_heartbeat,
        last_sent: Instant::now(),
        done: false,
        table: table.meta().clone(),
        who,
        tokens: state.tokens.clone(),
        next_check: Instant::now() + ACCESS_CHECK,
        pending: VecDeque::new(),
        durable: state.tables.settle_point(&table),
        store: state.tables.store().clone(),
    };
    let stream = futures_util::stream::unfold(feed, Feed::next);
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells proxies that buffer responses (nginx) to pass events through.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

/// One stream's state between chunks.
struct Feed {
    watcher: Watcher,
    filter: Filter,
    /// A `reset` to send before anything else.
    first: Option<Bytes>,
    heartbeat: Duration,
    /// When the stream last sent anything, for the heartbeat.
    last_sent: Instant,
    /// The stream sent its last event (`drop`, `lagged`, `revoked`).
    done: bool,
    /// The table watched, whose owner and access the stream re-checks.
    table: Arc<crate::store::Table>,
    /// Who opened the stream.
    who: Principal,
    /// The tokens in force: a stream whose token was removed ends.
    tokens: Arc<crate::api::tokens::TokenStore>,
    /// When to check access next.
    next_check: Instant,
    /// Changes read from the history and not yet sent (past a chunk's
    /// size).
    pending: VecDeque<Arc<Change>>,
    /// For a `sync` table: changes are sent only once durable, as an
    /// acknowledgement would be.
    durable: crate::tables::SettlePoint,
    /// For the revision of a `reset`.
    store: crate::store::Store,
}

impl Feed {
    /// The next chunk: the events of one read of the history, a heartbeat,
    /// or `None` at the end.
    async fn next(mut self) -> Option<(Result<Bytes, Infallible>, Feed)> {
        if self.done {
            return None;
        }
        if let Some(first) = self.first.take() {
            return Some(self.send(first));
        }
        loop {
            if self.access_lost() {
                self.done = true;
                return Some(self.send(Bytes::from_static(REVOKED)));
            }
            let since = self.last_sent.elapsed();
            if since < LINGER {
                tokio::time::sleep(LINGER - since).await;
            }
            let batch = if self.pending.is_empty() {
                match self.watcher.read(BATCH) {
                    Read::Changes(batch) => {
                        if !batch.is_empty() && !self.made_durable().await {
                            // The round that was to save them failed, and
                            // they may have been undone: the watcher must
                            // re-read rather than trust them.
                            let reset = reset_frame(self.store.revision());
                            return Some(self.send(reset));
                        }
                        batch.into()
                    }
                    Read::Lagged => {
                        self.done = true;
                        return Some(self.send(Bytes::from_static(LAGGED)));
                    }
                    Read::Closed => return None,
                }
            } else {
                std::mem::take(&mut self.pending)
            };
            if batch.is_empty() {
                let heartbeat = self.last_sent + self.heartbeat;
                let due = heartbeat.min(self.next_check);
                let woke = tokio::time::timeout_at(due, self.watcher.changed()).await;
                if woke.is_err() && Instant::now() >= heartbeat {
                    return Some(self.send(Bytes::from_static(HEARTBEAT)));
                }
                continue;
            }
            if let Some(chunk) = self.encode(batch) {
                return Some(self.send(chunk));
            }
        }
    }

    /// Waits, on a `sync` table, until every change read so far is on
    /// disk (one group-commit ticket, shared with the table's writers);
    /// false when the round failed.
    async fn made_durable(&self) -> bool {
        self.durable.settled().await
    }

    /// Whether the stream's principal lost read access, or its token was
    /// removed (checked every [`ACCESS_CHECK`]).
    fn access_lost(&mut self) -> bool {
        let now = Instant::now();
        if now < self.next_check {
            return false;
        }
        self.next_check = now + ACCESS_CHECK;
        !self.tokens.still_valid(&self.who) || authorize(&self.table, &self.who, Op::Read).is_err()
    }

    fn send(mut self, chunk: Bytes) -> (Result<Bytes, Infallible>, Feed) {
        self.last_sent = Instant::now();
        (Ok(chunk), self)
    }

    /// The frames of the changes this stream admits, in one chunk of at
    /// most [`CHUNK_BYTES`] (or one frame); `None` when it admits none of
    /// them. Changes past the chunk wait in `pending`. Stops after a
    /// `drop`.
    fn encode(&mut self, mut batch: VecDeque<Arc<Change>>) -> Option<Bytes> {
        let mut frames: Vec<Bytes> = Vec::new();
        let mut bytes = 0;
        while let Some(c) = batch.pop_front() {
            if !self.filter.admits(&c) {
                continue;
            }
            let f = c.encoded.get_or_init(|| frame(&c)).clone();
            if !frames.is_empty() && bytes + f.len() > CHUNK_BYTES {
                batch.push_front(c);
                break;
            }
            bytes += f.len();
            frames.push(f);
            if c.kind == ChangeKind::Drop {
                self.done = true;
                batch.clear();
                break;
            }
        }
        self.pending = batch;
        match frames.len() {
            0 => None,
            // One event: the shared frame itself, no copy.
            1 => frames.pop(),
            _ => Some(frames.concat().into()),
        }
    }
}

/// The SSE frame of one change.
fn frame(change: &Change) -> Bytes {
    let value_len = change.value.as_ref().map_or(0, |v| v.len());
    let mut out = Vec::with_capacity(96 + value_len);
    let rev = change.revision.to_string();
    out.extend_from_slice(b"id: ");
    out.extend_from_slice(rev.as_bytes());
    out.extend_from_slice(b"\nevent: ");
    out.extend_from_slice(change.kind.name().as_bytes());
    out.extend_from_slice(b"\ndata: {");
    if let Some(key) = &change.key {
        out.extend_from_slice(b"\"key\":");
        push_str(&mut out, key);
        out.push(b',');
    }
    if let Some(value) = &change.value {
        // Canonical JSON text never holds a raw line break.
        out.extend_from_slice(b"\"value\":");
        out.extend_from_slice(value.as_bytes());
        out.push(b',');
    }
    out.extend_from_slice(b"\"revision\":");
    out.extend_from_slice(rev.as_bytes());
    out.extend_from_slice(b"}\n\n");
    out.into()
}

/// The `reset` frame at `revision`.
fn reset_frame(revision: u64) -> Bytes {
    format!("id: {revision}\nevent: reset\ndata: {{\"revision\":{revision}}}\n\n").into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Key, Value};

    #[test]
    fn frames_carry_the_revision_twice_and_no_stray_line_break() {
        let put = Change::new(
            7,
            ChangeKind::Put,
            Some(Key::from("a\nb\"c")),
            Some(Value::parse(br#"{"t":"x\ny"}"#).unwrap()),
        );
        let text = String::from_utf8(frame(&put).to_vec()).unwrap();
        assert_eq!(
            text,
            "id: 7\nevent: put\ndata: {\"key\":\"a\\nb\\\"c\",\"value\":{\"t\":\"x\\ny\"},\"revision\":7}\n\n"
        );
        let clear = Change::new(9, ChangeKind::Clear, None, None);
        assert_eq!(
            frame(&clear).as_ref(),
            b"id: 9\nevent: clear\ndata: {\"revision\":9}\n\n"
        );
    }
}
