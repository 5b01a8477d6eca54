//! Format 2 → 3.
//!
//! Format 3 adds, without changing anything format 2 wrote:
//! - idempotency records of writes to a durable table, in that table's data
//!   tree under keys `\0i/<id>` (a NUL byte first, which no entry key has),
//!   written in the same atomic batch as the change they answer;
//! - `meta/cleared/<table>`: the revision of the table's latest saved
//!   clear; records at or below it are gone;
//! - `meta/revision_lease`: no revision above it has been handed out.
//!
//! A format-2 build would read the first as corrupt entries and ignore the
//! other two (bringing cleared records back, reusing revisions), so the
//! version goes up to keep it out. Nothing is rewritten: records kept by
//! format 2 in `meta/idempotency/<id>` are still read, and expire as they
//! did. Running the step again is harmless.

use crate::persist::{Engine, Migration, PersistError};

/// The step's entry in the migration list.
pub const MIGRATION: Migration = Migration {
    from: 2,
    summary: "idempotency records live with their tables' data; clear marks; a revision lease",
    run,
};

fn run(_engine: &dyn Engine) -> Result<(), PersistError> {
    Ok(())
}
