//! Format 3 → 4.
//!
//! Format 4 writes records of record format 3: format 2's record with the
//! Unix seconds of the entry's last write (`modified`, the source of
//! `Last-Modified`) after `expires_at`. Records of format 2 are still read,
//! with `modified` 0 (not known: their answers carry no `Last-Modified`
//! until the entry is written again), and each is rewritten in the new
//! layout the next time its key is saved.
//!
//! A format-3 build would take a format-3 record's first byte for an
//! unknown record format and stop, so the version goes up to keep it out
//! with a clear message instead. Nothing is rewritten; running the step
//! again is harmless.

use crate::persist::{Engine, Migration, PersistError};

/// The step's entry in the migration list.
pub const MIGRATION: Migration = Migration {
    from: 3,
    summary: "records keep the time of their last write (Last-Modified)",
    run,
};

fn run(_engine: &dyn Engine) -> Result<(), PersistError> {
    Ok(())
}
