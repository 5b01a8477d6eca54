//! Idempotency claims that share a cluster write's transaction.
//!
//! A keyed request on a cluster table must apply once across every node,
//! and its answer must be stored exactly when its change is. So the key is
//! claimed in the transaction that makes the change (an `INSERT … ON
//! CONFLICT` on `larder_idempotency`, first, before any row is touched),
//! and that transaction stays open until the answer is known: the answer
//! is written into the claimed row and only then does the transaction
//! commit. A second node given the same key at the same moment waits on
//! the claimed row and, once the first commits, finds it taken and
//! replays the stored answer; if the first rolls back (an error, a crash,
//! a lost connection), the second claims the key and applies.
//!
//! The request's handler does not know about any of this: the idempotency
//! layer runs it inside [`scope`], and the cluster table's write finds the
//! claim there.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use deadpool_postgres::Object;

use super::{db_error, Core};
use crate::ops::OpError;

tokio::task_local! {
    static CLAIM: Arc<Claim>;
}

/// The longest a write waits for a key claimed by a transaction still
/// open on another node before answering 409 `idempotency_in_flight`.
pub(super) const CLAIM_WAIT: Duration = Duration::from_secs(5);

/// Claims the key unless an unexpired answer holds it; an expired record
/// is taken over. Returns a row when the claim is this transaction's.
const CLAIM_KEY: &str = "INSERT INTO larder_idempotency (id, record, expires_at) \
    VALUES ($1, '', $2) ON CONFLICT (id) DO UPDATE \
    SET record = '', expires_at = EXCLUDED.expires_at \
    WHERE larder_idempotency.expires_at < $3 RETURNING 1";

/// One keyed request's claim on its key, for the cluster tier.
#[derive(Debug)]
pub struct Claim {
    id: String,
    expires_at: u64,
    state: Mutex<State>,
}

/// Where a claim stands.
#[derive(Debug, Default)]
enum State {
    /// No cluster write has run under it.
    #[default]
    Unused,
    /// Another request holds the key with a committed answer.
    Taken,
    /// A transaction holds the claim and the request's changes.
    Open(Box<OpenTx>),
}

/// What became of a claim once its request has run.
#[derive(Debug)]
pub enum Outcome {
    /// No cluster write ran: the answer is stored the ordinary way.
    Unused,
    /// Another request's committed answer holds the key: replay it.
    Taken,
    /// The request's changes wait for [`Open::commit`].
    Open(Open),
}

/// An open transaction holding a claim and the changes made under it.
#[derive(Debug)]
pub struct Open {
    id: String,
    tx: Box<OpenTx>,
}

/// A connection inside `BEGIN`, with what to do after its commit.
/// Dropped without [`OpenTx::commit`] or [`OpenTx::rollback`], it closes
/// the connection instead of returning it to the pool, so PostgreSQL
/// rolls the transaction back.
pub(super) struct OpenTx {
    client: Option<Object>,
    core: Arc<Core>,
    started: Instant,
    after_commit: Vec<Box<dyn FnOnce() + Send>>,
}

impl std::fmt::Debug for OpenTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenTx")
            .field("after_commit", &self.after_commit.len())
            .finish_non_exhaustive()
    }
}

impl Claim {
    /// A claim on the key `id` (the hashed caller, table and key) whose
    /// answer is kept until `expires_at` (Unix ms).
    pub fn new(id: String, expires_at: u64) -> Arc<Self> {
        Arc::new(Claim {
            id,
            expires_at,
            state: Mutex::new(State::Unused),
        })
    }

    /// What became of the claim; called once the request has run.
    pub fn outcome(&self) -> Outcome {
        let state = std::mem::take(&mut *self.lock());
        match state {
            State::Unused => Outcome::Unused,
            State::Taken => Outcome::Taken,
            State::Open(tx) => Outcome::Open(Open {
                id: self.id.clone(),
                tx,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The open transaction of an earlier write of the same request.
    pub(super) fn take_open(&self) -> Option<Box<OpenTx>> {
        let mut state = self.lock();
        match std::mem::take(&mut *state) {
            State::Open(tx) => Some(tx),
            other => {
                *state = other;
                None
            }
        }
    }

    /// Keeps `tx` open for the rest of the request.
    pub(super) fn park(&self, tx: Box<OpenTx>) {
        *self.lock() = State::Open(tx);
    }

    /// Opens a transaction and claims the key in it. `Ok(None)` when
    /// another request's committed answer holds the key (the claim is then
    /// [`Outcome::Taken`]).
    ///
    /// # Errors
    /// [`OpError::IdempotencyInFlight`] when another node's open
    /// transaction held the key for [`CLAIM_WAIT`];
    /// [`OpError::Unavailable`] when PostgreSQL cannot be reached.
    pub(super) async fn begin(&self, core: &Arc<Core>) -> Result<Option<Box<OpenTx>>, OpError> {
        let client = core.client().await?;
        let started = Instant::now();
        client
            .batch_execute(&format!(
                "BEGIN; SET LOCAL lock_timeout = {}",
                CLAIM_WAIT.as_millis()
            ))
            .await
            .map_err(|e| db_error(&e))?;
        let tx = Box::new(OpenTx {
            client: Some(client),
            core: core.clone(),
            started,
            after_commit: Vec::new(),
        });
        let now = core.now_ms() as i64;
        let claimed = tx
            .client()
            .query_opt(CLAIM_KEY, &[&self.id, &(self.expires_at as i64), &now])
            .await;
        match claimed {
            Ok(Some(_)) => Ok(Some(tx)),
            Ok(None) => {
                tx.rollback().await;
                *self.lock() = State::Taken;
                Ok(None)
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                tx.rollback().await;
                Err(OpError::IdempotencyInFlight)
            }
            Err(e) => Err(db_error(&e)),
        }
    }
}

/// The claim of the request running in this task, if it is keyed.
pub(super) fn current() -> Option<Arc<Claim>> {
    CLAIM.try_with(Arc::clone).ok()
}

/// Runs `f` (a keyed request's handler) with `claim` visible to the
/// cluster writes it makes.
pub async fn scope<F: std::future::Future>(claim: Arc<Claim>, f: F) -> F::Output {
    CLAIM.scope(claim, f).await
}

impl OpenTx {
    /// The connection, inside the transaction.
    pub(super) fn client(&self) -> &Object {
        // Only `commit` and `rollback` take it, and they consume `self`.
        self.client
            .as_ref()
            .unwrap_or_else(|| unreachable!("an open transaction without its connection"))
    }

    /// Runs `f` once the transaction has committed (the hot copy learns
    /// what was written only then).
    pub(super) fn after_commit(&mut self, f: Box<dyn FnOnce() + Send>) {
        self.after_commit.push(f);
    }

    /// Ends the transaction without its changes; the connection goes back
    /// to the pool when the rollback worked.
    pub(super) async fn rollback(mut self) {
        if let Some(client) = self.client.take() {
            if client.batch_execute("ROLLBACK").await.is_ok() {
                drop(client);
            } else {
                drop(Object::take(client));
            }
        }
    }

    async fn commit(mut self) -> Result<(), OpError> {
        let Some(client) = self.client.take() else {
            return Err(OpError::Internal("a transaction committed twice".into()));
        };
        match client.batch_execute("COMMIT").await {
            Ok(()) => {
                self.core.timed(self.started);
                for f in self.after_commit.drain(..) {
                    f();
                }
                Ok(())
            }
            Err(e) => {
                // Whether it committed is unknown; a retry with the same
                // key finds out (the answer is there, or the key is free).
                drop(Object::take(client));
                Err(db_error(&e))
            }
        }
    }
}

impl Drop for OpenTx {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Closing the connection rolls the transaction back; returned
            // to the pool, it would carry the transaction to the next user.
            drop(Object::take(client));
        }
    }
}

impl Open {
    /// Stores the request's answer (`Some(record)`, kept until
    /// `expires_at`) or frees the key (`None`, the answer is not kept), and
    /// commits together with the request's changes.
    ///
    /// # Errors
    /// [`OpError::Unavailable`] when the commit failed or its outcome is
    /// unknown: nothing is acknowledged, and a retry with the key either
    /// replays the answer or applies afresh.
    pub async fn commit(self, record: Option<(&str, u64)>) -> Result<(), OpError> {
        let Open { id, tx } = self;
        let stored = match record {
            Some((text, expires_at)) => {
                tx.client()
                    .execute(
                        "UPDATE larder_idempotency SET record = $2, expires_at = $3 WHERE id = $1",
                        &[&id, &text, &(expires_at as i64)],
                    )
                    .await
            }
            None => {
                tx.client()
                    .execute("DELETE FROM larder_idempotency WHERE id = $1", &[&id])
                    .await
            }
        };
        if let Err(e) = stored {
            tx.rollback().await;
            return Err(db_error(&e));
        }
        tx.commit().await
    }
}
