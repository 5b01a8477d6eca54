//! The cluster schema's versions and their application.
//!
//! Steps live in `migrations/cluster/` and are compiled in. At start a node
//! takes a session advisory lock (so nodes starting together apply each
//! step once), reads `larder_meta.schema_version`, applies every newer step
//! in its own transaction together with the version bump, and refuses to
//! run against a schema newer than it knows.

use super::ClusterError;

/// The steps, in order; step `n` (1-based) brings the schema to version `n`.
const STEPS: &[&str] = &[
    include_str!("../../migrations/cluster/0001_cluster_tables.sql"),
    include_str!("../../migrations/cluster/0002_idempotency.sql"),
    include_str!("../../migrations/cluster/0003_change_events.sql"),
    include_str!("../../migrations/cluster/0004_versions_after_xid.sql"),
];

/// Advisory lock key held while migrating ("larder" in ASCII, plus 1).
const MIGRATION_LOCK: i64 = 0x6c61_7264_6572_0001;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = STEPS.len() as i64;

fn pg(e: tokio_postgres::Error) -> ClusterError {
    ClusterError::Postgres(e.to_string())
}

/// Brings the database's schema to [`SCHEMA_VERSION`].
///
/// # Errors
/// [`ClusterError::TooNew`] for a newer schema, or what PostgreSQL said.
pub async fn migrate(client: &mut deadpool_postgres::Object) -> Result<(), ClusterError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg)?;
    let result = apply(client).await;
    // Released even when a step failed; a dropped connection releases it too.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(pg);
    result.and(unlocked.map(|_| ()))
}

async fn apply(client: &mut deadpool_postgres::Object) -> Result<(), ClusterError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS larder_meta (name text PRIMARY KEY, value bigint NOT NULL)",
        )
        .await
        .map_err(pg)?;
    let found: i64 = client
        .query_opt(
            "SELECT value FROM larder_meta WHERE name = 'schema_version'",
            &[],
        )
        .await
        .map_err(pg)?
        .map_or(0, |r| r.get(0));
    if found > SCHEMA_VERSION {
        return Err(ClusterError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (i, step) in STEPS.iter().enumerate().skip(found as usize) {
        let version = i as i64 + 1;
        let tx = client.transaction().await.map_err(pg)?;
        tx.batch_execute(step).await.map_err(pg)?;
        tx.execute(
            "INSERT INTO larder_meta (name, value) VALUES ('schema_version', $1) \
             ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value",
            &[&version],
        )
        .await
        .map_err(pg)?;
        tx.commit().await.map_err(pg)?;
        tracing::info!(version, "cluster schema migrated");
    }
    Ok(())
}
