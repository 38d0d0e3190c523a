-- The immudb state this deployment has verified: the anchor every later proof is checked
-- against. It lives outside immudb (a server cannot vouch for itself) and only moves forward, so
-- a restart never falls back to trust on first use and a rolled-back immudb is detected. Shared
-- by all replicas: each advances it after verifying a proof from the state it read.

CREATE TABLE immudb_trusted_state (
    immudb_database text        PRIMARY KEY,
    tx_id           bigint      NOT NULL CHECK (tx_id > 0),
    tx_hash         bytea       NOT NULL CHECK (octet_length(tx_hash) = 32),
    signature       jsonb,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION immudb_trusted_state_forward_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'UPDATE' THEN
        RAISE EXCEPTION 'immudb_trusted_state: % is not allowed', TG_OP
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.immudb_database <> OLD.immudb_database OR NEW.tx_id < OLD.tx_id
       OR (NEW.tx_id = OLD.tx_id AND NEW.tx_hash <> OLD.tx_hash) THEN
        RAISE EXCEPTION 'immudb_trusted_state only moves forward (tx % to %)', OLD.tx_id, NEW.tx_id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER immudb_trusted_state_forward
    BEFORE UPDATE OR DELETE ON immudb_trusted_state
    FOR EACH ROW EXECUTE FUNCTION immudb_trusted_state_forward_only();

CREATE TRIGGER immudb_trusted_state_no_truncate
    BEFORE TRUNCATE ON immudb_trusted_state
    FOR EACH STATEMENT EXECUTE FUNCTION immudb_trusted_state_forward_only();

GRANT SELECT, INSERT, UPDATE ON immudb_trusted_state TO audit_writer;
