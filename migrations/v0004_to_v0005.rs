//! Format 4 → 5.
//!
//! Format 5 stores the idempotency records that one write-back batch
//! carries as one item, a bundle (`\0b/` and a big-endian number), beside
//! the records stored one per item (`\0i/<id>`) that format 4 wrote and
//! format 5 still writes when its index of bundled records is full. A
//! format-4 build would take a bundle's key for an entry's and stop on a
//! corrupt record, so the version goes up to keep it out with a clear
//! message instead. Nothing is rewritten; running the step again is
//! harmless.

use crate::persist::{Engine, Migration, PersistError};

/// The step's entry in the migration list.
pub const MIGRATION: Migration = Migration {
    from: 4,
    summary: "idempotency records of one write-back batch are stored as one bundle",
    run,
};

fn run(_engine: &dyn Engine) -> Result<(), PersistError> {
    Ok(())
}
