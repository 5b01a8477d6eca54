//! The TTL sweeper: frees expired keys without a request touching them.
//!
//! Reads never return an expired key whether or not it has been swept; the
//! sweeper is what gives the memory back. Each step removes at most
//! [`SWEEP_BUDGET`] keys and then yields, so a burst of deadlines never
//! stalls request handling. Between steps it sleeps until the soonest
//! deadline (at most [`IDLE_SWEEP`]); a write that sets an earlier deadline
//! wakes it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::Store;

/// Keys removed per sweeper step before it yields.
pub const SWEEP_BUDGET: usize = 1000;
/// Longest sleep between sweeps when no deadline is near.
pub const IDLE_SWEEP: Duration = Duration::from_secs(1);

/// How writers reach the sleeping sweeper.
#[derive(Debug, Default)]
pub struct ExpiryWake {
    notify: Notify,
    /// Unix ms the sweeper sleeps towards; `u64::MAX` while it is running.
    sleeping_until: AtomicU64,
}

impl ExpiryWake {
    /// Called when a key gets `deadline`: wakes the sweeper if it would
    /// otherwise sleep past it.
    pub fn deadline_added(&self, deadline: u64) {
        if deadline < self.sleeping_until.load(Ordering::Relaxed) {
            self.notify.notify_one();
        }
    }
}

impl Store {
    /// One sweeper step: removes up to `budget` expired keys across tables.
    pub fn purge_expired(&self, budget: usize) -> usize {
        let now = self.now_ms();
        let mut removed = 0;
        for table in self.tables() {
            if removed >= budget {
                break;
            }
            removed += table.purge_expired(now, budget - removed);
        }
        removed
    }

    /// The soonest deadline in any table.
    pub fn next_deadline(&self) -> Option<u64> {
        self.tables().iter().filter_map(|t| t.next_deadline()).min()
    }

    /// Runs the sweeper until `stop` completes.
    pub async fn run_sweeper(&self, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let wake = &self.shared.expiry;
        loop {
            wake.sleeping_until.store(u64::MAX, Ordering::Relaxed);
            let removed = self.purge_expired(SWEEP_BUDGET);
            if removed == SWEEP_BUDGET {
                tokio::task::yield_now().await;
                continue;
            }
            let now = self.now_ms();
            let until = self
                .next_deadline()
                .unwrap_or(u64::MAX)
                .min(now.saturating_add(IDLE_SWEEP.as_millis() as u64));
            wake.sleeping_until.store(until, Ordering::Relaxed);
            let nap = Duration::from_millis(until.saturating_sub(now).max(1));
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(nap) => {}
                () = wake.notify.notified() => {}
            }
        }
    }
}
