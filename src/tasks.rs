//! [`Tasks`]: the one supervisor of the server's background tasks.
//!
//! Every task that runs beside the requests (the TTL sweeper, the watch
//! history retirer, the idempotency purger, the cluster's change-log
//! follower and sweeper) is started through it and stopped by it, in one
//! place: [`Tasks::stop`] cancels them all and waits until each has ended.
//! A task that panics is logged with its name; the others keep running.
//! The durable tier's persister is a thread of its own with its own final
//! round, stopped after these (see `app` for the whole shutdown order).

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The background tasks of one server. Cloning is shallow: every clone
/// starts tasks into, and stops, the same set.
#[derive(Debug, Clone, Default)]
pub struct Tasks {
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl Tasks {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts `work` as the background task `name`. It runs until it ends
    /// or the set is stopped, whichever comes first; when stopped, it is
    /// dropped at its next await point. Work that must finish a step
    /// before it stops watches [`Tasks::stopping`] itself. After
    /// [`Tasks::stop`] began, nothing is started.
    pub fn spawn(&self, name: &'static str, work: impl Future<Output = ()> + Send + 'static) {
        if self.stop.is_cancelled() {
            tracing::debug!(task = name, "not started: the server is stopping");
            return;
        }
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => tracing::debug!(task = name, "stopped"),
                ended = AssertUnwindSafe(work).catch_unwind() => match ended {
                    Ok(()) => tracing::debug!(task = name, "ended"),
                    Err(_) => tracing::error!(task = name, "background task panicked"),
                },
            }
        });
    }

    /// Completes once the set is being stopped.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.stop.clone().cancelled_owned()
    }

    /// Background tasks running now.
    pub fn running(&self) -> usize {
        self.tracker.len()
    }

    /// Stops every task and waits until each has ended.
    pub async fn stop(&self) {
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stop_ends_every_task_and_waits_for_them() {
        let tasks = Tasks::new();
        let (dropped_tx, dropped_rx) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn("forever", async move {
            // Dropped with the task: the receiver then sees the sender go.
            let _alive = dropped_tx;
            std::future::pending::<()>().await;
        });
        tasks.spawn("panics", async { panic!("on purpose") });
        // The panic ends its own task only.
        while tasks.running() > 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(tasks.running(), 1);
        tasks.stop().await;
        assert_eq!(tasks.running(), 0);
        assert!(dropped_rx.await.is_err(), "the endless task was dropped");
        tasks.spawn("late", async { panic!("must not start") });
        assert_eq!(tasks.running(), 0);
    }
}
