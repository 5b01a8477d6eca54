-- Change streams: what each key change was, and the value it carries, so
-- that every node can tell its watchers from the change log alone.
-- `event`: 0 put, 1 delete, 2 expire, 3 evict, -1 a change no watcher sees
-- (a bag given a value it holds only had its deadline moved). `value`: the
-- stored value of a put (for bags: the added one), the removed value of a
-- bag delete, NULL otherwise. Rows logged before this step read as puts
-- without a value, which no watcher is sent.
ALTER TABLE larder_changes
    ADD COLUMN event smallint NOT NULL DEFAULT 0,
    ADD COLUMN value text;
