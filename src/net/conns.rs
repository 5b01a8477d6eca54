//! Open client connections, as the connection cap and the timeouts see
//! them.
//!
//! A connection is always in one of three phases:
//! - *head*: waiting for a request head, from its accept or from the first
//!   byte after an idle spell;
//! - *busy*: at least one request is being served (its response not yet
//!   sent whole);
//! - *idle*: a keep-alive connection between requests.
//!
//! Phases change on the connection's own task (a read, a request admitted,
//! a response finished) with a few atomic stores and no lock. The registry's
//! lock is taken on accept, on close, by the periodic sweep that enforces
//! the header and idle timeouts, and to pick a connection to close when the
//! cap is reached: the one that has waited longest for a request head, else
//! the one idle longest. A connection that is busy is never picked.
//!
//! # Counting
//! `live` counts connections not yet told to close. A connection told to
//! close leaves that count at once, though its socket closes only when its
//! task next runs: the cap is about connections the server still serves,
//! and the descriptors of the ones closing are covered by the reserve
//! (see [`super::fd_budget`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Waiting for a request head.
const HEAD: u8 = 0;
/// Serving at least one request.
const BUSY: u8 = 1;
/// Between requests.
const IDLE: u8 = 2;

/// Why the server closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its request head did not arrive within `--header-timeout-ms`.
    HeaderTimeout,
    /// It stayed idle past `--idle-timeout-ms`.
    IdleTimeout,
    /// Closed to make room for a new connection at the cap.
    Evicted,
    /// A new connection closed at once: the cap was reached and no open one
    /// could make room.
    Refused,
    /// A request head went over 64 KiB (answered 431).
    HeadTooLarge,
}

impl CloseReason {
    /// Every reason, in the order of [`ConnStats::closed`].
    pub const ALL: [CloseReason; 5] = [
        CloseReason::HeaderTimeout,
        CloseReason::IdleTimeout,
        CloseReason::Evicted,
        CloseReason::Refused,
        CloseReason::HeadTooLarge,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HeaderTimeout => "header_timeout",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Evicted => "evicted",
            CloseReason::Refused => "refused",
            CloseReason::HeadTooLarge => "head_too_large",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// What the connection limits are.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Most connections served at once.
    pub max_connections: usize,
    /// Longest wait for a complete request head.
    pub header_timeout: Duration,
    /// Longest idle spell of a keep-alive connection.
    pub idle_timeout: Duration,
}

/// A snapshot of the registry for `/metrics`.
#[derive(Debug, Clone, Copy)]
pub struct ConnStats {
    /// Connections served now.
    pub open: usize,
    /// The cap.
    pub max: usize,
    /// Connections the server closed, by [`CloseReason::ALL`].
    pub closed: [u64; 5],
}

/// Every open connection. Shared by the accept loop, the connections'
/// tasks and the sweep.
#[derive(Debug)]
pub struct Connections {
    epoch: Instant,
    /// # Locking
    /// Held briefly: to add or remove one connection, or to look at all of
    /// them (the sweep, the pick at the cap). Never across an await.
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    live: AtomicUsize,
    limits: ConnLimits,
    closed: [AtomicU64; 5],
}

/// One connection's phase, shared by its task and the registry.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    epoch: Instant,
    phase: AtomicU8,
    /// Milliseconds after `epoch` at which the phase began.
    since_ms: AtomicU64,
    /// Requests whose responses are not sent whole.
    active: AtomicU32,
    /// Bytes of a next request arrived while busy (pipelining).
    read_while_busy: AtomicBool,
    /// Told to close; set once.
    closing: AtomicBool,
    close: Notify,
    /// Requests started on this connection so far.
    started: AtomicU64,
    registry: std::sync::Weak<Connections>,
}

impl Conn {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn enter(&self, phase: u8) {
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.phase.store(phase, Ordering::Release);
    }

    /// Bytes arrived: an idle connection starts waiting for its head.
    pub fn on_read(&self) {
        match self.phase.load(Ordering::Relaxed) {
            IDLE => self.enter(HEAD),
            BUSY => self.read_while_busy.store(true, Ordering::Relaxed),
            _ => {}
        }
    }

    /// A request head is complete: the connection is busy until the
    /// returned guard (carried by the response body) is dropped.
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.active.fetch_add(1, Ordering::Relaxed);
        self.phase.store(BUSY, Ordering::Release);
        RequestGuard(self.clone())
    }

    fn request_ended(&self) {
        if self.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            let next = if self.read_while_busy.swap(false, Ordering::Relaxed) {
                HEAD
            } else {
                IDLE
            };
            self.enter(next);
        }
    }

    /// Whether the connection is waiting for a request head.
    pub fn waiting_for_head(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == HEAD
    }

    /// How many requests have started on this connection: the number of
    /// the next one to start.
    pub fn requests_started(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    /// Counts the connection as closed because a request head went over
    /// the limit. It closes by itself once its answer is out (telling it
    /// to close would drop that answer).
    pub fn note_head_too_large(&self) {
        if let Some(registry) = self.registry.upgrade() {
            registry.count(CloseReason::HeadTooLarge);
        }
    }

    /// Completes once the registry told this connection to close.
    pub async fn closed(&self) {
        let notified = self.close.notified();
        if self.closing.load(Ordering::Acquire) {
            return;
        }
        notified.await;
    }
}

/// Held while a request's response is not sent whole.
#[derive(Debug)]
pub struct RequestGuard(Arc<Conn>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

/// A connection's place in the registry; dropping it removes the
/// connection.
#[derive(Debug)]
pub struct ConnHandle {
    conn: Arc<Conn>,
    registry: Arc<Connections>,
}

impl ConnHandle {
    /// The connection's shared phase.
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
}

impl Drop for ConnHandle {
    fn drop(&mut self) {
        self.registry.remove(&self.conn);
    }
}

impl Connections {
    /// An empty registry with `limits`.
    pub fn new(limits: ConnLimits) -> Self {
        Connections {
            epoch: Instant::now(),
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            live: AtomicUsize::new(0),
            limits: ConnLimits {
                max_connections: limits.max_connections.max(1),
                ..limits
            },
            closed: Default::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Conn>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The limits in force.
    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Takes a new connection in, first closing the one that waited
    /// longest for a request head (else the one idle longest) when the cap
    /// is reached. `None` when the cap is reached and every connection is
    /// busy: the caller closes the new one.
    pub fn register(self: &Arc<Self>) -> Option<ConnHandle> {
        if self.live.load(Ordering::Acquire) >= self.limits.max_connections && !self.make_room() {
            self.count(CloseReason::Refused);
            return None;
        }
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            epoch: self.epoch,
            phase: AtomicU8::new(HEAD),
            since_ms: AtomicU64::new(self.epoch.elapsed().as_millis() as u64),
            active: AtomicU32::new(0),
            read_while_busy: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            close: Notify::new(),
            started: AtomicU64::new(0),
            registry: Arc::downgrade(self),
        });
        self.live.fetch_add(1, Ordering::AcqRel);
        self.lock().insert(conn.id, conn.clone());
        Some(ConnHandle {
            conn,
            registry: self.clone(),
        })
    }

    /// Closes one connection to make room: the longest waiting for a head,
    /// else the longest idle. False when every connection is busy.
    pub fn make_room(&self) -> bool {
        let victim = {
            let open = self.lock();
            let oldest = |phase: u8| {
                open.values()
                    .filter(|c| {
                        !c.closing.load(Ordering::Relaxed)
                            && c.phase.load(Ordering::Acquire) == phase
                    })
                    .min_by_key(|c| c.since_ms.load(Ordering::Relaxed))
                    .cloned()
            };
            oldest(HEAD).or_else(|| oldest(IDLE))
        };
        match victim {
            Some(c) => {
                self.close(&c, CloseReason::Evicted);
                true
            }
            None => false,
        }
    }

    /// Tells `conn` to close, counting it under `why`, unless it was told
    /// already.
    fn close(&self, conn: &Conn, why: CloseReason) {
        if conn.closing.swap(true, Ordering::AcqRel) {
            return;
        }
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.count(why);
        conn.close.notify_one();
    }

    fn count(&self, why: CloseReason) {
        self.closed[why.index()].fetch_add(1, Ordering::Relaxed);
    }

    fn remove(&self, conn: &Conn) {
        if !conn.closing.swap(true, Ordering::AcqRel) {
            self.live.fetch_sub(1, Ordering::AcqRel);
        }
        self.lock().remove(&conn.id);
    }

    /// One pass of the timeouts: closes every connection whose head is
    /// overdue or whose idle spell is too long. Returns how many it closed.
    pub fn sweep(&self) -> usize {
        let now = self.epoch.elapsed().as_millis() as u64;
        let header = self.limits.header_timeout.as_millis() as u64;
        let idle = self.limits.idle_timeout.as_millis() as u64;
        let overdue: Vec<(Arc<Conn>, CloseReason)> = self
            .lock()
            .values()
            .filter(|c| !c.closing.load(Ordering::Relaxed))
            .filter_map(|c| {
                let phase = c.phase.load(Ordering::Acquire);
                let waited = now.saturating_sub(c.since_ms.load(Ordering::Relaxed));
                match phase {
                    HEAD if waited >= header => Some((c.clone(), CloseReason::HeaderTimeout)),
                    IDLE if waited >= idle => Some((c.clone(), CloseReason::IdleTimeout)),
                    _ => None,
                }
            })
            .collect();
        for (c, why) in &overdue {
            self.close(c, *why);
        }
        overdue.len()
    }

    /// How often [`Connections::sweep`] should run: often enough that a
    /// timeout is enforced within a tenth of the shorter one (at most
    /// every 250 ms, at least every 5 ms).
    pub fn sweep_every(&self) -> Duration {
        let shorter = self.limits.header_timeout.min(self.limits.idle_timeout);
        (shorter / 10).clamp(Duration::from_millis(5), Duration::from_millis(250))
    }

    /// Counts for `/metrics`.
    pub fn stats(&self) -> ConnStats {
        ConnStats {
            open: self.live.load(Ordering::Acquire),
            max: self.limits.max_connections,
            closed: std::array::from_fn(|i| self.closed[i].load(Ordering::Relaxed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize) -> Arc<Connections> {
        Arc::new(Connections::new(ConnLimits {
            max_connections: max,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }))
    }

    #[test]
    fn at_the_cap_the_longest_waiting_head_makes_room() {
        let r = registry(2);
        let a = r.register().expect("room");
        let b = r.register().expect("room");
        // a is busy, b waits for its head: b goes.
        let _serving = a.conn().request_started();
        let c = r.register().expect("b made room");
        assert!(b.conn().closing.load(Ordering::Relaxed));
        assert!(!a.conn().closing.load(Ordering::Relaxed));
        assert_eq!(r.stats().open, 2);
        // Now a is busy and c waits: c goes next, then nothing can.
        let d = r.register().expect("c made room");
        assert!(c.conn().closing.load(Ordering::Relaxed));
        let _serving_d = d.conn().request_started();
        assert!(r.register().is_none(), "every connection is busy");
        let stats = r.stats();
        assert_eq!(stats.closed[CloseReason::Evicted.index()], 2);
        assert_eq!(stats.closed[CloseReason::Refused.index()], 1);
    }

    #[test]
    fn idle_connections_go_when_no_head_is_waiting() {
        let r = registry(1);
        let a = r.register().expect("room");
        drop(a.conn().request_started());
        assert_eq!(a.conn().phase.load(Ordering::Relaxed), IDLE);
        let _b = r.register().expect("the idle one made room");
        assert!(a.conn().closing.load(Ordering::Relaxed));
    }

    #[test]
    fn bytes_after_an_idle_spell_start_a_head_and_pipelined_ones_wait() {
        let r = registry(4);
        let a = r.register().expect("room");
        let conn = a.conn();
        let serving = conn.request_started();
        conn.on_read();
        drop(serving);
        assert_eq!(conn.phase.load(Ordering::Relaxed), HEAD, "a pipelined head");
        drop(conn.request_started());
        assert_eq!(conn.phase.load(Ordering::Relaxed), IDLE);
        conn.on_read();
        assert_eq!(conn.phase.load(Ordering::Relaxed), HEAD);
    }

    #[test]
    fn the_sweep_closes_overdue_heads_and_idle_spells_only() {
        let r = Arc::new(Connections::new(ConnLimits {
            max_connections: 8,
            header_timeout: Duration::ZERO,
            idle_timeout: Duration::from_secs(3600),
        }));
        let head = r.register().expect("room");
        let idle = r.register().expect("room");
        drop(idle.conn().request_started());
        let busy = r.register().expect("room");
        let _serving = busy.conn().request_started();
        assert_eq!(r.sweep(), 1);
        assert!(head.conn().closing.load(Ordering::Relaxed));
        assert!(!idle.conn().closing.load(Ordering::Relaxed));
        assert!(!busy.conn().closing.load(Ordering::Relaxed));
        assert_eq!(r.stats().open, 2);
        drop(head);
        assert_eq!(
            r.stats().open,
            2,
            "a closed connection leaves the count once"
        );
    }
}
