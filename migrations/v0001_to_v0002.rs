//! Format 1 → 2.
//!
//! Format 1 records were `[kind u8][version u64][expires_at u64][payload]`
//! with no record format byte, and the directory did not record the highest
//! entry version handed out. Format 2 prefixes every record with its format
//! byte (2), so records can evolve one by one, and keeps `meta/revision` so
//! ETags issued before a restart never match a different entry after it.
//!
//! The step rewrites every format-1 record of every table in the layout
//! this build writes (record format 3 since directory format 4) and
//! records the highest version seen. Records already carrying a format byte
//! are left alone, so running it again after a crash part-way is harmless.

use crate::persist::{
    decode_slot, encode_slot, Engine, Migration, PersistError, RECORD_V2, RECORD_V3,
};

/// The step's entry in the migration list.
pub const MIGRATION: Migration = Migration {
    from: 1,
    summary: "records gain a format byte; the highest entry version is recorded",
    run,
};

/// Records rewritten per batch, to bound memory on large tables.
const BATCH: usize = 10_000;

fn run(engine: &dyn Engine) -> Result<(), PersistError> {
    let mut max_version = 0u64;
    for (table, _) in engine.table_defs()? {
        let mut batch = Vec::new();
        let mut pending = Vec::new();
        engine.for_each(&table, &mut |key, record| {
            if matches!(record.first(), Some(&RECORD_V2 | &RECORD_V3)) {
                return Ok(());
            }
            let slot = decode_slot(record)?;
            max_version = max_version.max(slot.version);
            batch.push((key.to_vec(), Some(encode_slot(&slot))));
            if batch.len() == BATCH {
                pending.push(std::mem::take(&mut batch));
            }
            Ok(())
        })?;
        pending.push(batch);
        for changes in pending {
            engine.write(&table, changes)?;
        }
    }
    engine.put_meta("revision", &max_version.to_be_bytes())
}
