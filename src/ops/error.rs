//! [`OpError`]: what a table operation of either tier can fail with.
//!
//! The tiers below the API speak this enum, never HTTP; the API layer maps
//! it to a status and a stable error code in one place
//! (`api::error`).

use crate::store::StoreError;

/// Why a table operation did not happen. Every variant means nothing was
/// changed, except where its text says otherwise.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// A rule of the table's type or of its settings refused the
    /// operation (the store's own errors, kept whole).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No table of this name (dropped meanwhile, or never made).
    #[error("table '{0}' does not exist")]
    TableNotFound(String),
    /// A table of this name exists already.
    #[error("table '{0}' already exists")]
    TableExists(String),
    /// An argument the tier checks itself (not the store) is wrong.
    #[error("{0}")]
    InvalidArgument(String),
    /// The table is at `max_entries` and does not evict.
    #[error("table is full ({0} entries) and does not evict")]
    TableFull(u64),
    /// The first request with the same `Idempotency-Key` is still running,
    /// here or on another node.
    #[error("the first request with this idempotency key is still running")]
    IdempotencyInFlight,
    /// One result alone is over the answer's byte limit.
    #[error("the answer would pass the {limit}-byte limit at key {key:?}")]
    ResultTooLarge {
        /// The key whose result is too large.
        key: String,
        /// Where to continue after it (`None`: it was the last).
        next_cursor: Option<String>,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The tier cannot serve now (the durable tier refuses writes after a
    /// failed round, the cluster database cannot be reached); a retry may
    /// succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The data directory's disk is full; the write was not applied (or
    /// was undone).
    #[error("the disk of the data directory is full")]
    StorageFull,
    /// The durable tier did not make the write durable (a failed round,
    /// or writes refused until the disk takes them again); the change was
    /// not applied or was undone. The tier's own error is kept as the
    /// source, for the log.
    #[error("could not make the write durable: {source}")]
    NotDurable {
        /// Why, as the durable tier said it.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An operation of a transaction failed in the tier (not in the
    /// store's rules), so none of them was applied.
    #[error("operation {op} of the transaction failed: {cause}")]
    TxnAborted {
        /// The failed operation's index in its branch.
        op: usize,
        /// Why it failed.
        cause: Box<OpError>,
    },
    /// A bug or an unexpected I/O failure.
    #[error("internal: {0}")]
    Internal(String),
}

/// Shorthand for the result of a table operation.
pub type OpResult<T> = Result<T, OpError>;
