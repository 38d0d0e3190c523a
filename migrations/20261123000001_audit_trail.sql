-- The queryable replica of the audit trail. immudb is the system of record; every row carries
-- what is needed to prove it against immudb (key, transaction id, SHA-256 of the original bytes).
-- Unqualified names: the migration runs inside the schema chosen by the connection's search_path.

CREATE TABLE audit_trail (
    event_id          uuid        PRIMARY KEY,
    event_timestamp   timestamptz NOT NULL,
    entity_type       text        NOT NULL,
    entity_id         text        NOT NULL,
    action            text        NOT NULL,
    user_id           text        NOT NULL,
    user_display_name text,
    trace_id          text,
    session_id        text,
    correlation_id    text,
    old_value         jsonb,
    new_value         jsonb,
    reason            text,
    signature_id      text,
    metadata          jsonb,
    module            text,
    risk_level        text CHECK (risk_level IN ('HIGH', 'MEDIUM', 'LOW')),
    compliance_flags  text[],
    source_system     text,
    event_version     text,
    category          text CHECK (category IN ('USER_ACTION', 'SYSTEM_EVENT', 'COMPLIANCE_EVENT',
                                                'SECURITY_EVENT', 'BATCH_LIFECYCLE')),
    immudb_key        text        NOT NULL,
    immudb_tx         bigint      NOT NULL CHECK (immudb_tx > 0),
    immudb_verified   boolean     NOT NULL DEFAULT false,
    payload_sha256    bytea       NOT NULL CHECK (octet_length(payload_sha256) = 32),
    source_topic      text        NOT NULL,
    source_partition  integer     NOT NULL CHECK (source_partition >= 0),
    source_offset     bigint      NOT NULL CHECK (source_offset >= 0),
    ingested_at       timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE audit_trail IS
    'Append-only replica of the immudb audit trail; UPDATE, DELETE and TRUNCATE are rejected.';
COMMENT ON COLUMN audit_trail.payload_sha256 IS
    'SHA-256 of the original Kafka payload bytes, which are the immudb value at immudb_key/immudb_tx.';
COMMENT ON COLUMN audit_trail.ingested_at IS 'When the row was stored (contemporaneity, ALCOA+).';

-- The queries auditors run: one entity's history, one user's actions, a time window, one trace.
CREATE INDEX audit_trail_entity_time_idx ON audit_trail (entity_type, entity_id, event_timestamp);
CREATE INDEX audit_trail_user_time_idx ON audit_trail (user_id, event_timestamp);
CREATE INDEX audit_trail_time_brin_idx ON audit_trail USING brin (event_timestamp);
CREATE INDEX audit_trail_trace_idx ON audit_trail (trace_id) WHERE trace_id IS NOT NULL;
CREATE INDEX audit_trail_correlation_idx ON audit_trail (correlation_id) WHERE correlation_id IS NOT NULL;
CREATE INDEX audit_trail_immudb_tx_idx ON audit_trail (immudb_tx);

-- Immutability: no row may change or disappear, whoever asks (a superuser has to disable the
-- trigger explicitly, which is itself visible in the server log and in reconcile's report).
CREATE FUNCTION audit_trail_reject_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_trail is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;

CREATE TRIGGER audit_trail_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_trail
    FOR EACH ROW EXECUTE FUNCTION audit_trail_reject_change();

CREATE TRIGGER audit_trail_no_truncate
    BEFORE TRUNCATE ON audit_trail
    FOR EACH STATEMENT EXECUTE FUNCTION audit_trail_reject_change();

-- The daemon's least-privilege role: read and append, nothing else. Roles are cluster-wide, so
-- it is created once; operators give it LOGIN and a password (or grant it to a login role).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'audit_writer') THEN
        BEGIN
            CREATE ROLE audit_writer NOLOGIN;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL; -- created concurrently by another migration run (parallel tests, replicas)
        END;
    END IF;
    EXECUTE format('GRANT USAGE ON SCHEMA %I TO audit_writer', current_schema());
END;
$$;

GRANT SELECT, INSERT ON audit_trail TO audit_writer;
