-- Versions are taken only by transactions that already have an id.
-- A node tells watchers a change once no transaction that could still
-- commit a lower version is running, and it finds those transactions by
-- their ids (src/cluster/follow.rs, `Events`). `nextval` alone does not
-- give a transaction an id, so a writer held up between taking its
-- version and its first write was invisible to that check: nodes told
-- higher versions first, and its change, once committed, was never told.
-- Every write takes its version through this function instead.
CREATE FUNCTION larder_next_version() RETURNS bigint
    LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN nextval('larder_versions');
END
$$;
