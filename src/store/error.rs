//! Errors the store reports; the API maps each to a status and a stable code.

use thiserror::Error;

/// Why a store operation did not happen. A failed operation changed nothing.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// No table of that name exists.
    #[error("table '{0}' does not exist")]
    TableNotFound(String),
    /// A table of that name already exists.
    #[error("table '{0}' already exists")]
    TableExists(String),
    /// The key is absent or expired.
    #[error("key not found")]
    KeyNotFound,
    /// A conditional write's precondition did not hold.
    #[error("{0}")]
    PreconditionFailed(&'static str),
    /// The counter target is not a 64-bit integer.
    #[error("{0}")]
    NotACounter(String),
    /// The stored value is not a JSON object, so it cannot be merge-patched.
    #[error("the stored value is not a JSON object")]
    NotAnObject,
    /// The operation does not exist for this table type.
    #[error("{0}")]
    WrongTableType(&'static str),
    /// A counter update would leave the 64-bit range.
    #[error("counter update overflows a 64-bit integer")]
    Overflow,
    /// The table is at `max_entries` and does not evict.
    #[error("table is full ({0} entries)")]
    TableFull(u64),
    /// The server-wide memory limit would be exceeded.
    #[error("server memory limit reached")]
    MemoryLimit,
    /// An argument is out of range or inconsistent.
    #[error("{0}")]
    InvalidArgument(String),
    /// An operation of a transaction failed, so none of them was applied.
    #[error("operation {op} of the transaction failed: {cause}")]
    TxnAborted {
        /// The failed operation's index in its branch.
        op: usize,
        /// Why it failed.
        cause: Box<StoreError>,
    },
    /// A transaction's results would pass its answer's byte limit.
    #[error("the transaction's results would pass the {limit}-byte limit at key {key:?}")]
    ResultTooLarge {
        /// The key whose result crossed the limit.
        key: String,
        /// The limit, in bytes.
        limit: usize,
    },
    /// Creating one more table would pass the server's table limit.
    #[error("the server already holds its limit of {0} tables")]
    TableLimit(usize),
}

/// Shorthand for store results.
pub type StoreResult<T> = Result<T, StoreError>;
