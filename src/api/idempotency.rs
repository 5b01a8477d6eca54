//! Idempotent retries: a write carrying `Idempotency-Key` is applied once,
//! and its answer is remembered for `--idempotency-ttl-secs`, scoped to the
//! principal and the table. A retry with the same key and the same method,
//! path and body gets the remembered answer with `Idempotent-Replayed:
//! true` and applies nothing; the same key with another request is 422; a
//! retry while the first is still running is 409.
//!
//! Records live in memory, and as durably as the write they answer: on a
//! `sync` table the write's own wait is deferred, the record handed to the
//! engine, and one round makes both durable before the answer is sent; on a
//! `periodic` table it is saved with the next write-back round, on a cluster
//! table it is committed in PostgreSQL (so a retry sent to another node is
//! answered too). Only 2xx answers are remembered: a failed request changed
//! nothing, so its retry runs afresh.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use dashmap::mapref::entry::Entry as MapEntry;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::respond::hex;
use super::routes::RouteClass;
use super::AppState;
use crate::api::error::ApiError;
use crate::ops::OpError;
use crate::store::{MemoryKind, MemoryUse};
use crate::tables::records::{Ran, RecordHome, RecordTarget};
use crate::tables::Tables;

/// The request header that names a write for retries.
pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// The response header of an answer replayed from a record.
pub static REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Longest key accepted, in bytes.
const MAX_KEY_BYTES: usize = 128;

/// The remembered answers of one server.
///
/// # Memory
/// Only the answers to writes on memory-only tables live here (they have
/// no other home), with the claims of requests in flight. They are counted
/// in the server's memory (kind `idempotency`) and capped at
/// `--idempotency-max-bytes`: past it the oldest expire early (counted in
/// `evicted`). Records of durable tables live in the durable tier alone
/// (the local engine, or PostgreSQL) and are read from there on a retry,
/// so a client that sends fresh keys to a durable table grows its disk,
/// not the server's memory.
#[derive(Debug)]
pub struct Idempotency {
    records: DashMap<String, Slot>,
    ttl_ms: u64,
    /// Memory records, oldest first, as `(id, stamp)`: the eviction order.
    /// Entries whose record is gone are skipped (and dropped by purges).
    order: Mutex<VecDeque<(String, u64)>>,
    /// Stamps records, so a queue entry names one record, not its id.
    stamps: AtomicU64,
    /// Bytes of the records in `records`.
    bytes: AtomicUsize,
    max_bytes: usize,
    memory: Arc<MemoryUse>,
    /// Records of memory tables expired early to stay under `max_bytes`.
    evicted: AtomicU64,
    /// Whether records written by builds that kept them apart from their
    /// tables' data remain: only then does a retry look there too.
    legacy: AtomicBool,
}

#[derive(Debug, Clone)]
enum Slot {
    /// The first request is running.
    InFlight { fingerprint: String },
    /// Its answer, with its place in the eviction order and its size.
    Done {
        record: Arc<Record>,
        stamp: u64,
        bytes: usize,
    },
}

/// Bytes a slot holds besides its strings: the map entry, the `Arc`, the
/// queue entry.
const SLOT_OVERHEAD: usize = 160;

impl Record {
    fn footprint(&self, id: &str) -> usize {
        SLOT_OVERHEAD
            + id.len() * 2
            + self.fingerprint.len()
            + self.body.len()
            + self.etag.as_ref().map_or(0, String::len)
            + self.content_type.as_ref().map_or(0, String::len)
    }
}

/// A remembered answer.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// SHA-256 (hex) of the request's method, path with query, and body.
    fingerprint: String,
    status: u16,
    etag: Option<String>,
    content_type: Option<String>,
    body: String,
    /// Unix ms after which the record is forgotten.
    expires_at: u64,
}

fn sha256(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    hex(&h.finalize())
}

/// The `Idempotency-Key` of a request it applies to: one that may change
/// something (a write or a manage operation, by its route), under `/v1/`.
/// Imports are left out: their bodies are streams up to
/// `--max-import-bytes`, not buffered for a record (a retried import of an
/// existing name is 409 anyway, never applied twice).
pub fn applies(req: &Request, class: RouteClass) -> Option<HeaderValue> {
    // Cheapest first: reads end at their class, writes without the header
    // (nearly all) at one header lookup.
    if !class.changes() || class.import {
        return None;
    }
    let key = req.headers().get(&IDEMPOTENCY_KEY)?;
    req.uri().path().starts_with("/v1/").then(|| key.clone())
}

/// The key of a `/v1/tables/{t}/entries/{key}[/…]` path: the key a write
/// on an entry route changes.
fn entry_key(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v1/tables/")?;
    let (_, rest) = rest.split_once("/entries/")?;
    let raw = rest.split('/').next().filter(|k| !k.is_empty())?;
    percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()
        .map(|k| k.into_owned())
}

/// The table a `/v1/tables/{t}/…` path names ("" for `/v1/tables`).
fn table_of(path: &str) -> String {
    let rest = path.strip_prefix("/v1/tables/").unwrap_or("");
    let raw = rest.split('/').next().unwrap_or("");
    percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned()
}

impl Idempotency {
    /// An empty set of records kept for `ttl_ms`, holding at most
    /// `max_bytes` of memory records, counted in `memory`.
    pub fn new(ttl_ms: u64, max_bytes: usize, memory: Arc<MemoryUse>) -> Self {
        Idempotency {
            records: DashMap::new(),
            ttl_ms,
            order: Mutex::new(VecDeque::new()),
            stamps: AtomicU64::new(0),
            bytes: AtomicUsize::new(0),
            max_bytes,
            memory,
            evicted: AtomicU64::new(0),
            legacy: AtomicBool::new(false),
        }
    }

    /// Bytes of memory records held now, and how many expired early.
    pub fn stats(&self) -> (usize, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.evicted.load(Ordering::Relaxed),
        )
    }

    fn count(&self, delta: isize) {
        if delta >= 0 {
            self.bytes
                .fetch_add(delta.unsigned_abs(), Ordering::Relaxed);
        } else {
            self.bytes
                .fetch_sub(delta.unsigned_abs(), Ordering::Relaxed);
        }
        self.memory.add(MemoryKind::Idempotency, delta as i64);
    }

    /// Remembers a memory table's answer, then expires the oldest records
    /// until the cap holds again.
    fn remember(&self, id: String, record: Arc<Record>) {
        let bytes = record.footprint(&id);
        let stamp = self.stamps.fetch_add(1, Ordering::Relaxed);
        self.count(bytes as isize);
        if let Some(Slot::Done { bytes: old, .. }) = self.records.insert(
            id.clone(),
            Slot::Done {
                record,
                stamp,
                bytes,
            },
        ) {
            self.count(-(old as isize));
        }
        let mut order = self.order.lock().unwrap_or_else(PoisonError::into_inner);
        order.push_back((id, stamp));
        while self.bytes.load(Ordering::Relaxed) > self.max_bytes {
            let Some((oldest, stamp)) = order.pop_front() else {
                break;
            };
            if self.forget(&oldest, |s| s == stamp) {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Removes the record `id` if `which` accepts its stamp; true if it did.
    fn forget(&self, id: &str, which: impl Fn(u64) -> bool) -> bool {
        let removed = self.records.remove_if(
            id,
            |_, s| matches!(s, Slot::Done { stamp, .. } if which(*stamp)),
        );
        match removed {
            Some((_, Slot::Done { bytes, .. })) => {
                self.count(-(bytes as isize));
                true
            }
            _ => false,
        }
    }

    /// Drops the expired records where builds before records moved in
    /// with their tables' data kept them, and notes whether any remain
    /// (lookups then look there too). Returns how many remain.
    ///
    /// # Errors
    /// What the durable tier met reading or removing them.
    pub fn load(&self, tables: &Tables, now: u64) -> Result<usize, OpError> {
        let kept = tables.load_legacy_records(|bytes| expired(bytes, now))?;
        self.legacy.store(kept > 0, Ordering::Release);
        Ok(kept)
    }

    /// Forgets expired records, in memory and where the tiers keep them.
    pub fn purge(&self, tables: &Tables, now: u64) {
        let expired_ids: Vec<(String, u64)> = self
            .records
            .iter()
            .filter_map(|e| match e.value() {
                Slot::Done { record, stamp, .. } if record.expires_at < now => {
                    Some((e.key().clone(), *stamp))
                }
                _ => None,
            })
            .collect();
        for (id, stamp) in expired_ids {
            self.forget(&id, |s| s == stamp);
        }
        // The eviction order loses the entries whose record is gone.
        self.order
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|(id, stamp)| {
                self.records
                    .get(id)
                    .is_some_and(|s| matches!(*s, Slot::Done { stamp: t, .. } if t == *stamp))
            });
        let legacy = self.legacy.load(Ordering::Acquire);
        if let Some(kept) = tables.purge_records(legacy, |bytes| expired(bytes, now)) {
            self.legacy.store(kept > 0, Ordering::Release);
        }
    }
}

/// Whether a stored record has expired by `now` (an unreadable one has).
fn expired(bytes: &[u8], now: u64) -> bool {
    serde_json::from_slice::<Record>(bytes).map_or(true, |r| r.expires_at < now)
}

/// Serves a write that carries `key`: replays, refuses, or runs it through
/// `run` and remembers a 2xx answer. `who` names the caller: keys are
/// per principal.
pub async fn serve<F, Fut>(
    state: &AppState,
    req: Request,
    who: Option<Arc<str>>,
    key: HeaderValue,
    run: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    match serve_inner(state, req, who, key, run).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

async fn serve_inner<F, Fut>(
    state: &AppState,
    req: Request,
    who: Option<Arc<str>>,
    key: HeaderValue,
    run: F,
) -> Result<Response, ApiError>
where
    F: FnOnce(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let key = key.as_bytes();
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.iter().all(|b| (0x20..=0x7e).contains(b))
    {
        return Err(ApiError::InvalidArgument(format!(
            "Idempotency-Key must be 1 to {MAX_KEY_BYTES} printable ASCII characters"
        )));
    }
    let principal = who.unwrap_or_else(|| Arc::from(""));
    let table = table_of(req.uri().path());
    let id = sha256(&[principal.as_bytes(), table.as_bytes(), key]);
    let (parts, body) = req.into_parts();
    let limit = state.limits.max_body_bytes;
    let body = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge(limit))?;
    let target = parts
        .uri
        .path_and_query()
        .map_or(parts.uri.path(), |p| p.as_str());
    let fingerprint = sha256(&[parts.method.as_str().as_bytes(), target.as_bytes(), &body]);
    let home = state.tables.record_home(&table);
    let records = &state.idempotency.records;
    let now = state.tables.store().now_ms();

    // Claim the key, or answer from what holds it.
    let idempotency = &state.idempotency;
    match records.entry(id.clone()) {
        MapEntry::Occupied(mut held) => match held.get() {
            Slot::Done { record, .. } if record.expires_at >= now => {
                return replay(record, &fingerprint)
            }
            Slot::Done { bytes, .. } => {
                idempotency.count(-(*bytes as isize));
                held.insert(Slot::InFlight {
                    fingerprint: fingerprint.clone(),
                });
            }
            Slot::InFlight { fingerprint: other } => {
                return Err(if *other == fingerprint {
                    ApiError::IdempotencyInFlight
                } else {
                    ApiError::IdempotencyKeyReused
                });
            }
        },
        MapEntry::Vacant(v) => {
            v.insert(Slot::InFlight {
                fingerprint: fingerprint.clone(),
            });
        }
    }
    // From here on, every way out that leaves the key in flight frees it.
    let claim = Claim {
        records,
        id: id.clone(),
        fingerprint: fingerprint.clone(),
    };
    // A durable table's records live in its tier only (on a cluster, a
    // record may have been made on another node).
    if let Some(stored) = stored_record(state, home, &table, &id).await? {
        if stored.expires_at >= now {
            return replay(&stored, &fingerprint);
        }
    }

    let anchor = entry_key(parts.uri.path());
    let request = Request::from_parts(parts, Body::from(body));
    let expires_at = now.saturating_add(state.idempotency.ttl_ms);
    let mut recording = state.tables.recording(home, &id, expires_at).await;
    let resp = match recording.run(run(request)).await {
        Ran::Here(resp) => resp,
        Ran::Elsewhere => {
            // Another node applied this key first and committed its answer.
            drop(claim);
            return match stored_record(state, home, &table, &id).await? {
                Some(stored) => replay(&stored, &fingerprint),
                None => Err(ApiError::IdempotencyInFlight),
            };
        }
    };
    if !resp.status().is_success() {
        // Not remembered: a retry may run afresh at once.
        recording.release().await?;
        drop(claim);
        recording.settle().await?;
        return Ok(resp);
    }
    let (parts, body) = resp.into_parts();
    let bytes = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => {
            return Err(ApiError::Internal(format!(
                "reading an answer to remember: {e}"
            )))
        }
    };
    let text = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let record = Arc::new(Record {
        fingerprint,
        status: parts.status.as_u16(),
        etag: text(&header::ETAG),
        content_type: text(&header::CONTENT_TYPE),
        body: String::from_utf8_lossy(&bytes).into_owned(),
        expires_at,
    });
    let json = serde_json::to_string(&*record).map_err(|e| ApiError::Internal(e.to_string()))?;
    let target = RecordTarget {
        table: &table,
        anchor: anchor.as_deref(),
        id: &id,
    };
    recording.keep(target, &json, expires_at).await?;
    if home == RecordHome::Memory {
        // Replaces the claim: the answer has no other home.
        idempotency.remember(id, record);
    }
    drop(claim);
    Ok(Response::from_parts(parts, Body::from(bytes)))
}

/// The record `id` as the table's tier keeps it, if any.
async fn stored_record(
    state: &AppState,
    home: RecordHome,
    table: &str,
    id: &str,
) -> Result<Option<Record>, ApiError> {
    let legacy = state.idempotency.legacy.load(Ordering::Acquire);
    let text = state.tables.stored_record(home, table, id, legacy).await?;
    Ok(text.and_then(|t| serde_json::from_slice(&t).ok()))
}

/// A request's claim on its key: dropped while still in flight (the answer
/// is not remembered, or the request ended early, a panic included), it
/// frees the key for a retry.
struct Claim<'a> {
    records: &'a DashMap<String, Slot>,
    id: String,
    fingerprint: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.records.remove_if(
            &self.id,
            |_, s| matches!(s, Slot::InFlight { fingerprint: f } if *f == self.fingerprint),
        );
    }
}

/// The remembered answer, or 422 when the key was used for another request.
fn replay(record: &Record, fingerprint: &str) -> Result<Response, ApiError> {
    if record.fingerprint != fingerprint {
        return Err(ApiError::IdempotencyKeyReused);
    }
    let mut resp = Response::new(Body::from(record.body.clone()));
    *resp.status_mut() = StatusCode::from_u16(record.status).unwrap_or(StatusCode::OK);
    let headers = resp.headers_mut();
    for (name, value) in [
        (&header::CONTENT_TYPE, &record.content_type),
        (&header::ETAG, &record.etag),
    ] {
        if let Some(v) = value.as_deref().and_then(|v| HeaderValue::from_str(v).ok()) {
            headers.insert(name.clone(), v);
        }
    }
    headers.insert(REPLAYED.clone(), HeaderValue::from_static("true"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_comes_from_the_path() {
        assert_eq!(table_of("/v1/tables/users/entries/a"), "users");
        assert_eq!(table_of("/v1/tables/a%20b"), "a b");
        assert_eq!(table_of("/v1/tables"), "");
    }

    #[test]
    fn fingerprints_separate_their_parts() {
        assert_ne!(sha256(&[b"ab", b"c"]), sha256(&[b"a", b"bc"]));
        assert_eq!(sha256(&[b"x"]).len(), 64);
    }
}
