//! Who is calling, and what they may do to a table.
//!
//! ETS guards a table by its owner process; larder guards it by the owning
//! principal, identified by a bearer token
//! ([`TokenStore`](super::tokens::TokenStore) holds the tokens in force).
//! The front middleware puts the caller's [`Principal`] in the request's
//! scope, and handlers check it with [`authorize`]. With no tokens
//! configured every caller is `anonymous`, with full rights.

use std::sync::Arc;

use crate::api::error::ApiError;
use crate::store::{Access, Table};

/// The principal every caller is when authentication is off.
pub const ANONYMOUS: &str = "anonymous";

/// The authenticated caller. Cloning is shallow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The principal's name, as in the tokens file.
    pub name: Arc<str>,
    /// Whether this principal may do everything.
    pub admin: bool,
    /// Whether the token used may only read (a `:read` line).
    pub read_only: bool,
    /// The SHA-256 of the token the caller came in with (`None` when
    /// authentication is off), so that a long stream can be revoked when
    /// its token is removed.
    pub token: Option<super::tokens::Digest>,
    /// The principal's own rate limit (`rate=` on its token lines).
    pub rate: Option<super::rate::Rate>,
}

impl Principal {
    /// The caller when authentication is off: may do everything.
    pub fn anonymous() -> Self {
        Principal {
            name: ANONYMOUS.into(),
            admin: true,
            read_only: false,
            token: None,
            rate: None,
        }
    }
}

/// What a request does to a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Lookups, scans, table info.
    Read,
    /// Changes to entries, clear, sync.
    Write,
    /// Changes to the table itself: settings, drop, give-away. Owner or admin.
    Manage,
}

/// Checks that `who` may perform `op` on `table`.
///
/// # Errors
/// [`ApiError::Forbidden`].
pub fn authorize(table: &Table, who: &Principal, op: Op) -> Result<(), ApiError> {
    if who.admin {
        return Ok(());
    }
    let owner = table.owner();
    let is_owner = *owner == *who.name;
    let allowed = match (table.access(), op) {
        (_, Op::Manage) => is_owner,
        (Access::Public, _) => true,
        (Access::Protected, Op::Read) => true,
        (Access::Protected, Op::Write) => is_owner,
        (Access::Private, _) => is_owner,
    };
    if allowed {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "principal '{}' may not {} table '{}' ({:?} access, owned by '{}')",
            who.name,
            match op {
                Op::Read => "read",
                Op::Write => "write to",
                Op::Manage => "manage",
            },
            table.name(),
            table.access(),
            owner
        )))
    }
}
