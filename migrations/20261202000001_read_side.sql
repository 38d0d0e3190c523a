-- The read side (`audit-consumer serve`): a SELECT-only role, and the indexes its query shapes
-- need for keyset pages ordered by (event_timestamp, event_id) in both directions.

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'audit_reader') THEN
        BEGIN
            CREATE ROLE audit_reader NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- created concurrently by another migration run (parallel tests, replicas)
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO audit_reader', current_schema());
END;
$$;

-- Read only: the rows and the trusted state `?verify=true` proves against. Nothing else.
GRANT SELECT ON audit_trail, immudb_trusted_state TO audit_reader;

-- Pages over time with any low-selectivity filter (action, category, risk_level, source_topic)
-- walk this index in order and stop after one page; the event_id makes the order total, so a
-- keyset cursor (timestamp, event_id) resumes exactly.
CREATE INDEX audit_trail_time_id_idx ON audit_trail (event_timestamp, event_id);

-- An entity's history and one user's actions, paged: the same total order per entity / user.
-- They replace the (…, event_timestamp) indexes of the first migration, which cannot resume a
-- page between two events of the same instant without a sort.
CREATE INDEX audit_trail_entity_time_id_idx
    ON audit_trail (entity_type, entity_id, event_timestamp, event_id);
DROP INDEX audit_trail_entity_time_idx;
CREATE INDEX audit_trail_user_time_id_idx ON audit_trail (user_id, event_timestamp, event_id);
DROP INDEX audit_trail_user_time_idx;
