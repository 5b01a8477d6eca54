//! The revision lease: how far the store may hand out revisions before the
//! durable tier has stored a higher mark.
//!
//! Revisions are ETags and watch ids, and clients keep them: one handed out
//! twice (a change acknowledged, lost in a crash, and its revision given
//! again to another change after the restart) would let a stale ETag match
//! or a resumed watch skip or repeat a change. So the durable tier stores a
//! *lease* before any revision past the previous one is used, and a
//! restart continues past the stored lease: every revision after a restart
//! is greater than every revision handed out before it, whatever was lost.
//!
//! The lease moves ahead in blocks of [`LEASE_BLOCK`], asked for when half
//! of the block is used, so writers almost never wait for it: one small
//! write and fsync per million revisions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

/// Revisions one lease step covers.
pub const LEASE_BLOCK: u64 = 1 << 20;

/// The lease and what waits on it.
#[derive(Default)]
pub(crate) struct Lease {
    /// Revisions up to this one may be handed out; `u64::MAX` until a
    /// durable tier takes charge (a store of its own, in tests).
    limit: AtomicU64,
    /// Writers that reached the limit wait here for it to move.
    lock: Mutex<()>,
    moved: Condvar,
    /// Set once a move was asked for and not yet made.
    asked: AtomicBool,
    /// Asks the durable tier to move the lease: soon (`false`), or now, in
    /// the calling thread (`true`), since the caller may hold a key's lock
    /// that a write-back round in progress waits for.
    ask: OnceLock<Box<dyn Fn(bool) + Send + Sync>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("limit", &self.limit.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Lease {
    pub(crate) fn unlimited() -> Self {
        Lease {
            limit: AtomicU64::new(u64::MAX),
            ..Lease::default()
        }
    }

    /// The limit now.
    pub(crate) fn limit(&self) -> u64 {
        self.limit.load(Ordering::Acquire)
    }

    /// Called with each revision handed out: asks for the next block when
    /// half of this one is used, and waits while `revision` is past the
    /// limit (which the durable tier is then moving).
    pub(crate) fn check(&self, revision: u64) {
        let limit = self.limit();
        if revision.saturating_add(LEASE_BLOCK / 2) <= limit {
            return;
        }
        if !self.asked.swap(true, Ordering::AcqRel) {
            self.ask(false);
        }
        while revision > self.limit() {
            // Rare (the block ran out before the persister moved it): move
            // it here, then look again; a failed move is retried after a
            // pause, as nothing past the stored lease may be handed out.
            self.ask(true);
            if revision > self.limit() {
                let guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
                let _ = self
                    .moved
                    .wait_timeout(guard, Duration::from_millis(100))
                    .unwrap_or_else(PoisonError::into_inner);
            }
        }
    }

    fn ask(&self, now: bool) {
        match self.ask.get() {
            Some(ask) => ask(now),
            // Nobody to ask: nothing is durable, nothing can be lost.
            None => self.set(u64::MAX),
        }
    }

    /// Moves the limit (after the durable tier stored it) and wakes the
    /// writers waiting for it.
    pub(crate) fn set(&self, limit: u64) {
        {
            let _guard = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
            self.limit.store(limit, Ordering::Release);
            self.asked.store(false, Ordering::Release);
        }
        self.moved.notify_all();
    }

    /// Sets what to call when the lease runs low (once).
    pub(crate) fn on_low(&self, ask: Box<dyn Fn(bool) + Send + Sync>) {
        let _ = self.ask.set(ask);
    }

    /// Whether a move was asked for and not yet made.
    pub(crate) fn wanted(&self) -> bool {
        self.asked.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn writers_wait_past_the_limit_until_it_moves() {
        let lease = Arc::new(Lease::unlimited());
        lease.set(10);
        let asked = Arc::new(AtomicU64::new(0));
        {
            let (lease2, asked) = (lease.clone(), asked.clone());
            lease.on_low(Box::new(move |now| {
                asked.fetch_add(1, Ordering::SeqCst);
                let lease = lease2.clone();
                if now {
                    lease.set(10 + LEASE_BLOCK);
                } else {
                    std::thread::spawn(move || lease.set(10 + LEASE_BLOCK));
                }
            }));
        }
        // Within the limit, a low lease only asks.
        lease.check(5);
        assert!(asked.load(Ordering::SeqCst) >= 1);
        // Past it, the writer waits for the move.
        lease.check(11);
        assert!(lease.limit() >= 11);
    }

    #[test]
    fn an_unlimited_lease_never_asks() {
        let lease = Lease::unlimited();
        lease.check(u64::MAX - 1);
        assert!(!lease.wanted());
    }
}
