-- Cluster tables, schema version 1.
--
-- Applied by larder at start under an advisory lock, in one transaction,
-- together with the version bump in larder_meta. Every object name starts
-- with larder_ so the schema can share a database with others.

-- Entry versions (ETags) and table ids: one sequence, so a version is never
-- reused by a re-created table of the same name.
CREATE SEQUENCE larder_versions;

-- One row per cluster table. `settings` is the table's settings as the API
-- shows them (JSON); `revision` changes with every settings or owner change.
CREATE TABLE larder_tables (
    id          bigint PRIMARY KEY DEFAULT nextval('larder_versions'),
    name        text NOT NULL UNIQUE,
    settings    text NOT NULL,
    owner       text NOT NULL,
    created_at  bigint NOT NULL,
    revision    bigint NOT NULL
);

-- One row per key. `objects` is canonical JSON: the value for set types,
-- `[[seq, value], ...]` in insertion order for bag types. `key` compares
-- bytewise (collation "C"), which is the API's key order.
CREATE TABLE larder_entries (
    table_id    bigint NOT NULL REFERENCES larder_tables (id) ON DELETE CASCADE,
    key         text COLLATE "C" NOT NULL,
    objects     text NOT NULL,
    count       integer NOT NULL,
    version     bigint NOT NULL,
    expires_at  bigint NOT NULL,
    touched_at  bigint NOT NULL,
    PRIMARY KEY (table_id, key)
);
CREATE INDEX larder_entries_deadline ON larder_entries (expires_at) WHERE expires_at > 0;
CREATE INDEX larder_entries_touched ON larder_entries (table_id, touched_at);

-- Table-wide statistics, split over 64 rows per table so that writers of
-- different keys rarely wait for each other; a reader sums them.
CREATE TABLE larder_counts (
    table_id    bigint NOT NULL REFERENCES larder_tables (id) ON DELETE CASCADE,
    shard       integer NOT NULL,
    size        bigint NOT NULL DEFAULT 0,
    inserts     bigint NOT NULL DEFAULT 0,
    deletes     bigint NOT NULL DEFAULT 0,
    expired     bigint NOT NULL DEFAULT 0,
    evicted     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (table_id, shard)
);

-- The change log every node follows to keep its hot copy coherent. `xid`
-- is the writing transaction's id: a node reads rows in (xid, id) order and
-- only moves its position past transactions older than every one still
-- running, so no committed change is skipped. `key` is NULL for changes of
-- the whole table; `kind`: 0 a key changed, 1 the table's definition
-- changed (or it was created), 2 the table was dropped, 3 it was emptied.
CREATE TABLE larder_changes (
    id          bigserial PRIMARY KEY,
    xid         bigint NOT NULL DEFAULT (pg_current_xact_id()::text::bigint),
    table_id    bigint NOT NULL,
    key         text COLLATE "C",
    version     bigint NOT NULL,
    kind        smallint NOT NULL,
    at          bigint NOT NULL
);
CREATE INDEX larder_changes_order ON larder_changes (xid, id);

-- How far the change log has been pruned: a node whose position is older
-- cannot fill its gap and drops its hot copy.
INSERT INTO larder_meta (name, value) VALUES ('pruned_xid', 0), ('pruned_id', 0);
