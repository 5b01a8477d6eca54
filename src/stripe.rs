//! Values that every request updates, spread over per-thread slots.
//!
//! One shared atomic that every request adds to bounces its cache line
//! between cores on every request. A [`Striped`] value keeps one copy per
//! slot, each on its own cache lines; a thread always updates the slot it
//! was given, and a reader combines all of them. The table statistics and
//! the request metrics are striped this way.

use std::sync::atomic::{AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

/// Slots per striped value: more than the cores of the machines larder is
/// measured on, so two busy threads rarely share one.
pub const SLOTS: usize = 8;

/// `SLOTS` copies of a `T`, each alone on its cache lines (crossbeam's
/// `CachePadded` knows how wide that is per architecture: 128 bytes on
/// x86_64, where lines are prefetched in pairs).
#[derive(Debug, Default)]
pub struct Striped<T>([CachePadded<T>; SLOTS]);

thread_local! {
    /// The slot this thread updates, handed out round robin.
    static SLOT: usize = {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        NEXT.fetch_add(1, Ordering::Relaxed) % SLOTS
    };
}

impl<T> Striped<T> {
    /// This thread's copy.
    pub fn mine(&self) -> &T {
        &self.0[SLOT.with(|s| *s)]
    }

    /// Every copy, for a reader to combine.
    pub fn all(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|p| &**p)
    }
}
