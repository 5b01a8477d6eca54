//! The statements a cluster write issues, in one place: the table code
//! runs them, and the benchmark issues the very same ones straight to
//! PostgreSQL for its baseline.

/// Statistics rows per table; a key's changes are counted in one of them.
pub const COUNT_SHARDS: u32 = 64;

/// A key's row, for a read.
pub const SELECT_ROW: &str =
    "SELECT objects, version, expires_at, count, touched_at FROM larder_entries \
                          WHERE table_id = $1 AND key = $2";

/// A key's row, locked until the transaction ends: the first statement
/// of every write.
pub const LOCK_ROW: &str =
    "SELECT objects, version, expires_at, count, touched_at FROM larder_entries \
                        WHERE table_id = $1 AND key = $2 FOR UPDATE";

/// Inserts a key's row, appends the change and adds to the statistics;
/// returns the new version. Parameters: table id, key, objects text,
/// object count, deadline (0: none), now, statistics shard, the deltas of
/// size, inserts, deletes and expired, and the change's event and value
/// for watchers (see `migrations/cluster/0003_change_events.sql`).
pub const INSERT_ROW: &str = "WITH v AS (SELECT larder_next_version() AS version), \
    w AS (INSERT INTO larder_entries (table_id, key, objects, count, version, expires_at, touched_at) \
          SELECT $1, $2, $3, $4, version, $5, $6 FROM v RETURNING version), \
    c AS (INSERT INTO larder_changes (table_id, key, version, kind, at, event, value) \
          SELECT $1, $2, version, 0, $6, $12, $13 FROM w), \
    s AS (UPDATE larder_counts SET size = size + $8, inserts = inserts + $9, \
          deletes = deletes + $10, expired = expired + $11 WHERE table_id = $1 AND shard = $7) \
    SELECT version FROM w";

/// Replaces a key's row; the same parameters and result as [`INSERT_ROW`].
pub const UPDATE_ROW: &str = "WITH v AS (SELECT larder_next_version() AS version), \
    w AS (UPDATE larder_entries SET objects = $3, count = $4, version = (SELECT version FROM v), \
          expires_at = $5, touched_at = $6 WHERE table_id = $1 AND key = $2 RETURNING version), \
    c AS (INSERT INTO larder_changes (table_id, key, version, kind, at, event, value) \
          SELECT $1, $2, version, 0, $6, $12, $13 FROM w), \
    s AS (UPDATE larder_counts SET size = size + $8, inserts = inserts + $9, \
          deletes = deletes + $10, expired = expired + $11 WHERE table_id = $1 AND shard = $7) \
    SELECT version FROM w";

/// Deletes a key's row, appends the change and adds to the statistics;
/// returns the version of the deletion. Parameters: table id, key, now,
/// statistics shard, the deltas of size, deletes, expired and evicted, and
/// the change's event for watchers.
pub const DELETE_ROW: &str = "WITH v AS (SELECT larder_next_version() AS version), \
    w AS (DELETE FROM larder_entries WHERE table_id = $1 AND key = $2 \
          RETURNING (SELECT version FROM v) AS version), \
    c AS (INSERT INTO larder_changes (table_id, key, version, kind, at, event) \
          SELECT $1, $2, version, 0, $3, $9 FROM w), \
    s AS (UPDATE larder_counts SET size = size + $5, deletes = deletes + $6, \
          expired = expired + $7, evicted = evicted + $8 WHERE table_id = $1 AND shard = $4) \
    SELECT version FROM w";

/// The statistics row a key's changes are counted in.
pub fn shard_of(key: &str) -> i32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % COUNT_SHARDS) as i32
}

/// `larder_changes.event` of a stored value (for bags: an added one).
pub const EVENT_PUT: i16 = 0;
/// `larder_changes.event` of a removed key, or of one removed bag value.
pub const EVENT_DELETE: i16 = 1;
/// `larder_changes.event` of a key whose deadline passed.
pub const EVENT_EXPIRE: i16 = 2;
/// `larder_changes.event` of a key evicted to make room.
pub const EVENT_EVICT: i16 = 3;
/// `larder_changes.event` of a change no watcher sees.
pub const EVENT_NONE: i16 = -1;
