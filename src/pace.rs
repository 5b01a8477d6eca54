//! The rhythm of long work (scans, selects, exports, imports): give the
//! worker thread back every few milliseconds, and stop before the
//! request's deadline with what was done so far.
//!
//! A request that walks a million entries would otherwise keep its worker
//! thread for the whole walk; on a two-core machine two such requests stop
//! every other request, health probes included. [`Pace::tick`] is called
//! between steps of the walk (a page, a few hundred objects): it yields
//! when the current slice has run for [`SLICE`], and says when to stop.

use std::time::{Duration, Instant};

/// Longest a long request runs before it lets other tasks run.
pub const SLICE: Duration = Duration::from_millis(5);

/// Where a long request is in its slice and its time.
#[derive(Debug, Clone)]
pub struct Pace {
    slice_started: Instant,
    stop_at: Option<Instant>,
}

impl Pace {
    /// Long work that must stop at `stop_at` (`None`: no deadline).
    pub fn new(stop_at: Option<Instant>) -> Self {
        Pace {
            slice_started: Instant::now(),
            stop_at,
        }
    }

    /// When the work must stop.
    pub fn stop_at(&self) -> Option<Instant> {
        self.stop_at
    }

    /// Whether the deadline has passed.
    pub fn out_of_time(&self) -> bool {
        self.stop_at.is_some_and(|at| Instant::now() >= at)
    }

    /// Between two steps: yields the worker if this slice ran long enough;
    /// false when the work must stop now.
    pub async fn tick(&mut self) -> bool {
        let now = Instant::now();
        if self.stop_at.is_some_and(|at| now >= at) {
            return false;
        }
        if now.duration_since(self.slice_started) >= SLICE {
            tokio::task::yield_now().await;
            self.slice_started = Instant::now();
        }
        true
    }
}

/// When long work should stop to answer by `deadline`: a tenth of the
/// time it was given earlier (at most a second), so that its answer is
/// written before the deadline passes.
pub fn stop_before(deadline: Instant, given: Duration) -> Instant {
    let margin = (given / 10).min(Duration::from_secs(1));
    deadline.checked_sub(margin).unwrap_or(deadline)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pace_past_its_deadline_says_stop() {
        let mut p = Pace::new(Some(Instant::now()));
        assert!(!p.tick().await);
        assert!(p.out_of_time());
        let mut free = Pace::new(None);
        assert!(free.tick().await);
        assert!(!free.out_of_time());
    }

    #[test]
    fn work_stops_a_tenth_early() {
        let now = Instant::now();
        let deadline = now + Duration::from_secs(30);
        assert_eq!(
            stop_before(deadline, Duration::from_secs(30)),
            deadline - Duration::from_secs(1)
        );
        assert_eq!(
            stop_before(deadline, Duration::from_millis(500)),
            deadline - Duration::from_millis(50)
        );
    }
}
