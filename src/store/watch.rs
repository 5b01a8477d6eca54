//! Change feeds: what a table tells its watchers.
//!
//! Over 600 lines, a third of them tests: the history, its limits and
//! the watchers share one lock and must be read together.
//!
//! A table gets a [`Hub`] the first time someone watches it; until then its
//! writers pay one atomic load to see that there is none. The hub keeps the
//! table's last changes in order (its history) and wakes watchers when a
//! change arrives. Watchers read the history at their own pace, each with
//! its own position: a writer never waits for a watcher, and a watcher that
//! falls further behind than the history reaches is told it lagged.
//!
//! # Order
//! A writer takes its revision and publishes its change while holding the
//! hub's lock (and its key's shard lock), so the history is in revision
//! order and every watcher sees the changes of a table in the order they
//! were applied.
//!
//! # Tables nobody watches any more
//! A hub keeps recording for `idle_keep` (60 s) after its last watcher
//! left, so a client that lost its connection can resume. After that the
//! hub goes dormant: writers see one flag and record nothing, as on a
//! table never watched. The next watch wakes it, with its history starting
//! afresh, so a resume from before then gets `reset`.
//!
//! # Bounds
//! The history holds at most `max_events` changes and `max_bytes` bytes of
//! keys and values. A watcher holds a position and the batch it is sending,
//! so its memory is bounded whatever its reader does.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::Notify;

use super::memory::{MemoryKind, MemoryUse};
use super::value::{Key, Value};

/// What happened to a key, or to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// A value was stored (for bag types: added).
    Put,
    /// The key was removed, or (with a value) one bag value was.
    Delete,
    /// The key's deadline passed.
    Expire,
    /// The key was evicted to make room.
    Evict,
    /// Every object was removed (`delete_all_objects`).
    Clear,
    /// The table was dropped; nothing follows.
    Drop,
    /// Changes were missed (a cluster node fell behind the change log):
    /// the watcher must re-read the table, then follow again.
    Reset,
}

impl ChangeKind {
    /// The SSE event name.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Put => "put",
            ChangeKind::Delete => "delete",
            ChangeKind::Expire => "expire",
            ChangeKind::Evict => "evict",
            ChangeKind::Clear => "clear",
            ChangeKind::Drop => "drop",
            ChangeKind::Reset => "reset",
        }
    }
}

/// One change of a table, as its watchers receive it.
#[derive(Debug)]
pub struct Change {
    /// The change's revision: the version its write's ETag carries.
    pub revision: u64,
    /// What happened.
    pub kind: ChangeKind,
    /// The key; `None` for `Clear` and `Drop`.
    pub key: Option<Key>,
    /// The stored value of a `Put`, the removed value of a bag `Delete`.
    pub value: Option<Value>,
    /// The change's wire form, made once by the first watcher that sends
    /// it and shared by the others.
    pub encoded: OnceLock<Bytes>,
}

impl Change {
    /// A change not yet encoded.
    pub fn new(revision: u64, kind: ChangeKind, key: Option<Key>, value: Option<Value>) -> Self {
        Change {
            revision,
            kind,
            key,
            value,
            encoded: OnceLock::new(),
        }
    }

    fn bytes(&self) -> usize {
        std::mem::size_of::<Change>()
            + self.key.as_ref().map_or(0, |k| k.len())
            + self.value.as_ref().map_or(0, Value::len)
    }
}

/// How much history a hub keeps, and for how long without watchers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most changes kept.
    pub max_events: usize,
    /// Most bytes of keys, values and bookkeeping kept.
    pub max_bytes: usize,
    /// How long a hub keeps recording after its last watcher left.
    pub idle_keep: Duration,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            max_events: 10_000,
            max_bytes: 64 << 20,
            idle_keep: Duration::from_secs(60),
        }
    }
}

/// The history of one table's changes and the watchers' wake-up call.
#[derive(Debug)]
pub struct Hub {
    log: Mutex<Log>,
    /// Where the history's bytes are counted (kind `watch`).
    memory: Arc<MemoryUse>,
    wake: Notify,
    limits: HistoryLimits,
    /// Watchers alive now.
    watchers: AtomicUsize,
    /// When the hub was made: the origin of `idle_since_ms`.
    born: Instant,
    /// Milliseconds after `born` at which the last watcher left.
    idle_since_ms: AtomicU64,
    /// Recording stopped: nobody watched for `idle_keep`.
    dormant: AtomicBool,
}

#[derive(Debug)]
struct Log {
    changes: VecDeque<Arc<Change>>,
    /// Position (count of changes ever kept) of `changes[0]`.
    first: u64,
    /// Every change of the table with a revision above this is in `changes`.
    covers_after: u64,
    /// The revision of the latest change, or where the history began.
    head: u64,
    bytes: usize,
    /// No change follows: the table was dropped or the server is stopping.
    closed: bool,
}

/// Where a new watcher starts.
#[derive(Debug)]
pub struct Start {
    /// The first thing to send: `Some(revision)` for a `reset` at that
    /// revision, when the history does not reach back to `since`.
    pub reset: Option<u64>,
    /// The watcher, positioned after `since` (or at the live end).
    pub watcher: Watcher,
}

/// One reader's position in a hub's history.
#[derive(Debug)]
pub struct Watcher {
    hub: Arc<Hub>,
    next: u64,
}

/// What a watcher's read found.
#[derive(Debug)]
pub enum Read {
    /// Changes after the previous read, oldest first (possibly none).
    Changes(Vec<Arc<Change>>),
    /// Changes this watcher had not read were dropped from the history.
    Lagged,
    /// Nothing more will come.
    Closed,
}

impl Hub {
    /// A hub whose history begins after `revision`: changes of the table
    /// up to it are not (and never will be) in the history.
    pub fn new(revision: u64, limits: HistoryLimits) -> Self {
        Self::counted(revision, limits, Arc::default())
    }

    /// Like [`Hub::new`], counting its history's bytes in `memory`.
    pub fn counted(revision: u64, limits: HistoryLimits, memory: Arc<MemoryUse>) -> Self {
        Hub {
            memory,
            log: Mutex::new(Log {
                changes: VecDeque::new(),
                first: 0,
                covers_after: revision,
                head: revision,
                bytes: 0,
                closed: false,
            }),
            wake: Notify::new(),
            watchers: AtomicUsize::new(0),
            born: Instant::now(),
            idle_since_ms: AtomicU64::new(0),
            dormant: AtomicBool::new(false),
            limits: HistoryLimits {
                max_events: limits.max_events.max(1),
                max_bytes: limits.max_bytes.max(1),
                ..limits
            },
        }
    }

    fn lock(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts recording one change: hold the returned guard while taking
    /// the change's revision and applying it, then publish.
    pub fn begin(&self) -> Recording<'_> {
        Recording {
            hub: self,
            log: Some(self.lock()),
            pushed: false,
        }
    }

    /// Publishes a change made elsewhere (a cluster table's change log),
    /// unless the history already holds a change at or after its revision.
    pub fn publish(&self, change: Change) {
        let mut rec = self.begin();
        if change.revision > rec.head() {
            rec.push(change);
        }
    }

    /// The revision of the latest change published (or where the history
    /// began).
    pub fn head(&self) -> u64 {
        self.lock().head
    }

    /// How many watchers are alive.
    pub fn watchers(&self) -> usize {
        self.watchers.load(Ordering::Acquire)
    }

    fn age_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Whether a writer should record its change: the hub has watchers,
    /// or lost its last one less than `idle_keep` ago. Past that it goes
    /// dormant. Call under the changing key's shard lock.
    pub fn records(&self) -> bool {
        if self.dormant.load(Ordering::Acquire) {
            return false;
        }
        if self.watchers.load(Ordering::Acquire) > 0 {
            return true;
        }
        let idle = self.idle_since_ms.load(Ordering::Acquire);
        if self.age_ms() < idle.saturating_add(self.limits.idle_keep.as_millis() as u64) {
            return true;
        }
        self.dormant.store(true, Ordering::Release);
        false
    }

    /// Counts a new watcher in if others are watching; `false` when there
    /// are none, and the caller must join with no change under way
    /// ([`Hub::join_quiet`]).
    pub fn join_busy(&self) -> bool {
        let mut n = self.watchers.load(Ordering::Acquire);
        while n > 0 {
            match self
                .watchers
                .compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(now) => n = now,
            }
        }
        false
    }

    /// Counts a new watcher in while no change is under way (every shard
    /// of the table locked). A dormant hub wakes with its history starting
    /// after `revision`, the table's revision now.
    pub fn join_quiet(&self, revision: u64) {
        if self.dormant.load(Ordering::Acquire) {
            let mut log = self.lock();
            self.forget(&mut log);
            log.covers_after = revision;
            log.head = log.head.max(revision);
            self.dormant.store(false, Ordering::Release);
        }
        self.watchers.fetch_add(1, Ordering::AcqRel);
    }

    /// Empties the history, giving its bytes back.
    fn forget(&self, log: &mut Log) {
        log.first += log.changes.len() as u64;
        log.changes = VecDeque::new();
        self.memory.add(MemoryKind::Watch, -(log.bytes as i64));
        log.bytes = 0;
    }

    /// Frees the history of a hub nobody has watched for `idle_keep`: it
    /// goes dormant at once, rather than when a writer next looks. True
    /// when it did.
    pub fn retire_if_idle(&self) -> bool {
        if self.watchers.load(Ordering::Acquire) > 0 {
            return false;
        }
        // A writer may have found the hub idle first and made it dormant
        // without freeing anything.
        if !self.dormant.load(Ordering::Acquire) {
            let idle = self.idle_since_ms.load(Ordering::Acquire);
            if self.age_ms() < idle.saturating_add(self.limits.idle_keep.as_millis() as u64) {
                return false;
            }
        }
        let mut log = self.lock();
        // A watcher may have joined since the look above.
        if self.watchers.load(Ordering::Acquire) > 0 || log.changes.is_empty() {
            return false;
        }
        self.dormant.store(true, Ordering::Release);
        self.forget(&mut log);
        true
    }

    /// Bytes the history holds now.
    pub fn history_bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Ends every watch: after what they have not read, they end.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_waiters();
    }

    /// Publishes `drop` at the revision `next` takes (under the lock, so it
    /// follows every change already published) and closes the hub.
    pub fn drop_table(&self, next: impl FnOnce() -> u64) {
        let mut rec = self.begin();
        rec.push(Change::new(next(), ChangeKind::Drop, None, None));
        if let Some(log) = rec.log.as_mut() {
            log.closed = true;
        }
    }

    /// A new watcher, already counted in by [`Hub::join_busy`] or
    /// [`Hub::join_quiet`], that receives every change after `since`
    /// (every later change when `None`). When the history no longer holds
    /// every change after `since`, or `since` is ahead of the table, the
    /// watcher starts at the live end with a `reset` at the current
    /// revision.
    pub fn watch(self: &Arc<Self>, since: Option<u64>) -> Start {
        let log = self.lock();
        let end = log.first + log.changes.len() as u64;
        let (reset, next) = match since {
            None => (None, end),
            Some(r) if r < log.covers_after || r > log.head => (Some(log.head), end),
            Some(r) => {
                let skip = log.changes.partition_point(|c| c.revision <= r);
                (None, log.first + skip as u64)
            }
        };
        Start {
            reset,
            watcher: Watcher {
                hub: self.clone(),
                next,
            },
        }
    }
}

/// A change being recorded: holds the hub's lock so that changes are
/// published in the order their revisions were taken.
#[derive(Debug)]
pub struct Recording<'a> {
    hub: &'a Hub,
    /// Always `Some` until dropped.
    log: Option<MutexGuard<'a, Log>>,
    pushed: bool,
}

impl Recording<'_> {
    /// The revision of the latest change published.
    pub fn head(&self) -> u64 {
        self.log.as_ref().map_or(0, |log| log.head)
    }

    /// Adds `change` to the history, dropping the oldest changes past the
    /// limits, and wakes the watchers once the lock is released.
    pub fn push(&mut self, change: Change) {
        let Some(log) = self.log.as_deref_mut() else {
            return;
        };
        // A dormant hub records nothing: its next watcher starts afresh.
        if log.closed || self.hub.dormant.load(Ordering::Acquire) {
            return;
        }
        self.pushed = true;
        log.head = log.head.max(change.revision);
        let mut grown = change.bytes() as i64;
        log.bytes += change.bytes();
        log.changes.push_back(Arc::new(change));
        while log.changes.len() > self.hub.limits.max_events
            || (log.bytes > self.hub.limits.max_bytes && log.changes.len() > 1)
        {
            if let Some(old) = log.changes.pop_front() {
                log.bytes -= old.bytes();
                grown -= old.bytes() as i64;
                log.covers_after = old.revision;
                log.first += 1;
            }
        }
        self.hub.memory.add(MemoryKind::Watch, grown);
    }
}

impl Drop for Recording<'_> {
    fn drop(&mut self) {
        // Unlock first, so the woken watchers do not wait for the lock. A
        // watcher that checked the log before the push was already waiting
        // and is woken; one that checks after the unlock sees the change.
        drop(self.log.take());
        if self.pushed {
            self.hub.wake.notify_waiters();
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let bytes = self
            .log
            .get_mut()
            .map_or_else(|e| e.into_inner().bytes, |l| l.bytes);
        self.memory.add(MemoryKind::Watch, -(bytes as i64));
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // The time first: a writer that sees no watcher left must find a
        // recent idle time, not an old one that stops recording at once.
        self.hub
            .idle_since_ms
            .store(self.hub.age_ms(), Ordering::Release);
        self.hub.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Watcher {
    /// Up to `max` changes after the previous read, without waiting.
    pub fn read(&mut self, max: usize) -> Read {
        let log = self.hub.lock();
        if self.next < log.first {
            return Read::Lagged;
        }
        let from = (self.next - log.first) as usize;
        let batch: Vec<Arc<Change>> = log.changes.iter().skip(from).take(max).cloned().collect();
        if batch.is_empty() && log.closed {
            return Read::Closed;
        }
        self.next += batch.len() as u64;
        Read::Changes(batch)
    }

    /// Waits until a change arrives after the previous read, the hub
    /// closes, or (with changes already there) at once.
    pub async fn changed(&self) {
        let notified = self.hub.wake.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        {
            let log = self.hub.lock();
            if log.closed || self.next < log.first + log.changes.len() as u64 {
                return;
            }
        }
        notified.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(rev: u64, key: &str) -> Change {
        Change::new(
            rev,
            ChangeKind::Put,
            Some(Key::from(key)),
            Some(Value::from_canonical(b"1")),
        )
    }

    /// A watcher counted in, as the table does it.
    fn joined(hub: &Arc<Hub>, since: Option<u64>) -> Start {
        if !hub.join_busy() {
            hub.join_quiet(hub.head());
        }
        hub.watch(since)
    }

    fn revisions(read: Read) -> Vec<u64> {
        match read {
            Read::Changes(v) => v.iter().map(|c| c.revision).collect(),
            other => panic!("expected changes, got {other:?}"),
        }
    }

    fn limits(max_events: usize) -> HistoryLimits {
        HistoryLimits {
            max_events,
            max_bytes: 1 << 20,
            ..HistoryLimits::default()
        }
    }

    #[test]
    fn a_resume_replays_exactly_what_followed() {
        let hub = Arc::new(Hub::new(10, limits(100)));
        for rev in [12, 15, 19] {
            hub.begin().push(put(rev, "k"));
        }
        let start = joined(&hub, Some(12));
        assert_eq!(start.reset, None);
        let mut w = start.watcher;
        assert_eq!(revisions(w.read(10)), vec![15, 19]);
        assert_eq!(
            revisions(joined(&hub, Some(10)).watcher.read(10)),
            vec![12, 15, 19]
        );
        assert_eq!(
            revisions(joined(&hub, None).watcher.read(10)),
            Vec::<u64>::new()
        );
    }

    #[test]
    fn a_resume_from_before_the_history_is_a_reset() {
        let hub = Arc::new(Hub::new(10, limits(2)));
        for rev in [12, 15, 19] {
            hub.begin().push(put(rev, "k"));
        }
        // 12 fell out: a resume from 11 or earlier cannot be served, one
        // from 12 (everything after it is kept) can.
        assert_eq!(joined(&hub, Some(11)).reset, Some(19));
        assert_eq!(joined(&hub, Some(9)).reset, Some(19));
        assert_eq!(joined(&hub, Some(12)).reset, None);
        assert_eq!(joined(&hub, Some(20)).reset, Some(19));
    }

    #[test]
    fn a_reader_overtaken_by_the_history_has_lagged() {
        let hub = Arc::new(Hub::new(0, limits(3)));
        let mut w = joined(&hub, None).watcher;
        hub.begin().push(put(1, "a"));
        assert_eq!(revisions(w.read(10)), vec![1]);
        for rev in 2..=5 {
            hub.begin().push(put(rev, "a"));
        }
        assert!(matches!(w.read(10), Read::Lagged));
    }

    #[test]
    fn a_byte_limit_bounds_the_history() {
        let hub = Arc::new(Hub::new(
            0,
            HistoryLimits {
                max_events: 1000,
                max_bytes: 3 * (std::mem::size_of::<Change>() + 2),
                ..HistoryLimits::default()
            },
        ));
        for rev in 1..=10 {
            hub.begin().push(put(rev, "a"));
        }
        assert_eq!(
            revisions(joined(&hub, Some(7)).watcher.read(100)),
            vec![8, 9, 10]
        );
        assert_eq!(joined(&hub, Some(6)).reset, Some(10));
    }

    #[test]
    fn a_dropped_table_ends_its_watches_after_the_drop() {
        let hub = Arc::new(Hub::new(0, limits(10)));
        let mut w = joined(&hub, None).watcher;
        hub.drop_table(|| 4);
        hub.begin().push(put(5, "late"));
        let changes = match w.read(10) {
            Read::Changes(v) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].kind, ChangeKind::Drop);
        assert!(matches!(w.read(10), Read::Closed));
    }

    #[tokio::test]
    async fn a_waiting_watcher_wakes_on_a_change() {
        let hub = Arc::new(Hub::new(0, limits(10)));
        let mut w = joined(&hub, None).watcher;
        let writer = {
            let hub = hub.clone();
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                hub.begin().push(put(1, "a"));
            })
        };
        w.changed().await;
        assert_eq!(revisions(w.read(10)), vec![1]);
        writer.await.unwrap();
    }
}

#[cfg(test)]
mod idle {
    use super::*;

    #[test]
    fn a_hub_without_watchers_stops_recording_after_idle_keep_and_wakes_afresh() {
        let hub = Arc::new(Hub::new(
            0,
            HistoryLimits {
                idle_keep: Duration::ZERO,
                ..HistoryLimits::default()
            },
        ));
        hub.join_quiet(0);
        let w = hub.watch(None).watcher;
        assert!(hub.records());
        drop(w);
        // No watcher and no time to keep: dormant, and writers skip.
        assert!(!hub.records());
        assert!(!hub.join_busy());
        hub.join_quiet(40);
        assert!(hub.records());
        let start = hub.watch(Some(10));
        assert_eq!(start.reset, Some(40), "history restarts at the wake-up");
        assert_eq!(hub.watchers(), 1);
    }
}
