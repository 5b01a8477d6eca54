//! Format upgrades of the data directory, applied in order at start.
//!
//! The directory records its format version in `meta/format_version`. Each
//! step from version N to N+1 lives in `migrations/` at the repository root,
//! with its layout described there, and is compiled in here. A directory from
//! a newer larder is refused, never rewritten.

use super::codec::FORMAT_VERSION;
use super::{Engine, PersistError};

/// One format step.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// The version this step upgrades from (to `from + 1`).
    pub from: u32,
    /// What changes, for the log.
    pub summary: &'static str,
    /// Rewrites the data; must be safe to run again after a crash part-way.
    pub run: fn(&dyn Engine) -> Result<(), PersistError>,
}

#[path = "../../migrations/v0001_to_v0002.rs"]
mod v0001_to_v0002;
#[path = "../../migrations/v0002_to_v0003.rs"]
mod v0002_to_v0003;
#[path = "../../migrations/v0003_to_v0004.rs"]
mod v0003_to_v0004;
#[path = "../../migrations/v0004_to_v0005.rs"]
mod v0004_to_v0005;

/// Every step, oldest first.
pub const MIGRATIONS: &[Migration] = &[
    v0001_to_v0002::MIGRATION,
    v0002_to_v0003::MIGRATION,
    v0003_to_v0004::MIGRATION,
    v0004_to_v0005::MIGRATION,
];

const VERSION_KEY: &str = "format_version";

fn read_version(engine: &dyn Engine) -> Result<Option<u32>, PersistError> {
    engine
        .get_meta(VERSION_KEY)?
        .map(|b| {
            <[u8; 4]>::try_from(b.as_slice())
                .map(u32::from_be_bytes)
                .map_err(|_| PersistError::Corrupt("format version is not 4 bytes".into()))
        })
        .transpose()
}

/// Records `version` as the directory's format.
///
/// # Errors
/// [`PersistError::Engine`].
pub fn write_version(engine: &dyn Engine, version: u32) -> Result<(), PersistError> {
    engine.put_meta(VERSION_KEY, &version.to_be_bytes())?;
    engine.flush()
}

/// Brings the directory to [`FORMAT_VERSION`]; returns the version found
/// (`None` for a new directory).
///
/// # Errors
/// [`PersistError::TooNew`] for a newer directory, [`PersistError::Corrupt`]
/// for one that has tables but no version, and what a step returns.
pub fn migrate(engine: &dyn Engine) -> Result<Option<u32>, PersistError> {
    let Some(found) = read_version(engine)? else {
        if !engine.table_defs()?.is_empty() {
            return Err(PersistError::Corrupt(
                "it holds tables but no format version".into(),
            ));
        }
        write_version(engine, FORMAT_VERSION)?;
        return Ok(None);
    };
    if found > FORMAT_VERSION {
        return Err(PersistError::TooNew {
            found,
            supported: FORMAT_VERSION,
        });
    }
    let mut version = found;
    while version < FORMAT_VERSION {
        let step = MIGRATIONS
            .iter()
            .find(|m| m.from == version)
            .ok_or_else(|| PersistError::Corrupt(format!("no upgrade from format {version}")))?;
        tracing::info!(
            from = version,
            to = version + 1,
            summary = step.summary,
            "upgrading data directory"
        );
        (step.run)(engine)?;
        write_version(engine, version + 1)?;
        version += 1;
    }
    Ok(Some(found))
}
