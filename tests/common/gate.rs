//! Failpoint gates: pause the first thread that reaches a named failpoint
//! until the test releases it, so a test can force one exact interleaving
//! of two racing code paths instead of sleeping and hoping.
//!
//! Failpoints are process-wide, so every test that arms one holds
//! [`exclusive`] for its whole run.

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// How long a test waits for a failpoint to be reached before failing.
const REACH_DEADLINE: Duration = Duration::from_secs(30);

/// Serializes the tests of one binary that arm failpoints.
pub async fn exclusive() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A failpoint that holds the first thread to reach it.
pub struct Gate {
    name: &'static str,
    reached: watch::Receiver<bool>,
    open: Arc<(Mutex<bool>, Condvar)>,
}

impl Gate {
    /// Arms `name`: the first thread to reach it blocks there until
    /// [`Gate::release`]; later ones pass.
    pub fn pause_first(name: &'static str) -> Gate {
        let (tx, reached) = watch::channel(false);
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let held = open.clone();
        let taken = Mutex::new(false);
        fail::cfg_callback(name, move || {
            {
                let mut t = taken.lock().unwrap();
                if *t {
                    return;
                }
                *t = true;
            }
            let _ = tx.send(true);
            let (lock, cv) = &*held;
            let mut open = lock.lock().unwrap();
            while !*open {
                open = cv.wait(open).unwrap();
            }
        })
        .expect("failpoint armed");
        Gate {
            name,
            reached,
            open,
        }
    }

    /// Arms `name` to only report that it was reached, without holding anyone.
    pub fn signal(name: &'static str) -> Gate {
        let (tx, reached) = watch::channel(false);
        fail::cfg_callback(name, move || {
            let _ = tx.send(true);
        })
        .expect("failpoint armed");
        Gate {
            name,
            reached,
            open: Arc::new((Mutex::new(true), Condvar::new())),
        }
    }

    /// Waits until some thread has reached the failpoint.
    pub async fn reached(&mut self) {
        tokio::time::timeout(REACH_DEADLINE, self.reached.wait_for(|r| *r))
            .await
            .unwrap_or_else(|_| panic!("failpoint {} was not reached in time", self.name))
            .expect("gate alive");
    }

    /// Whether some thread has reached the failpoint.
    pub fn was_reached(&self) -> bool {
        *self.reached.borrow()
    }

    /// Lets the held thread go on.
    pub fn release(&self) {
        let (lock, cv) = &*self.open;
        *lock.lock().unwrap() = true;
        cv.notify_all();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.release();
        fail::remove(self.name);
    }
}
