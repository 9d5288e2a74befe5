-- Each event's HMAC-SHA256 under a key derived from the master key (src/store/authenticity.rs):
-- `orgledger verify` names an event altered, moved or written without that key. The check is
-- NOT VALID so that adding it reads none of the existing rows (all without a MAC); new and
-- updated rows are checked.
ALTER TABLE events ADD COLUMN mac bytea;
ALTER TABLE events ADD CONSTRAINT events_mac_length CHECK (octet_length(mac) = 32) NOT VALID;

-- The events stored before MACs, listed as the column is added: the only rows that may later
-- be given a MAC (`orgledger migrate --authenticate-legacy-events`). Nothing may change the
-- list, so a row written since cannot pass for one of them.
CREATE TABLE events_before_macs
(
    aggregate_type text   NOT NULL,
    aggregate_id   text   NOT NULL,
    sequence       bigint NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
INSERT INTO events_before_macs (aggregate_type, aggregate_id, sequence)
SELECT aggregate_type, aggregate_id, sequence FROM events;

CREATE FUNCTION events_before_macs_are_fixed() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'the events stored before MACs are fixed: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER events_before_macs_refuse_changes
    BEFORE INSERT OR UPDATE OR DELETE ON events_before_macs
    FOR EACH ROW EXECUTE FUNCTION events_before_macs_are_fixed();
CREATE TRIGGER events_before_macs_refuse_truncate
    BEFORE TRUNCATE ON events_before_macs
    FOR EACH STATEMENT EXECUTE FUNCTION events_before_macs_are_fixed();

-- One update becomes possible: giving a listed event its MAC. Nothing else of the row may
-- change with it (compared as text: jsonb equality would take 5.0 for 5), and a MAC once set
-- never changes.
CREATE OR REPLACE FUNCTION events_are_append_only() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.mac IS NULL AND NEW.mac IS NOT NULL
           AND (to_jsonb(NEW) - 'mac')::text = (to_jsonb(OLD) - 'mac')::text
           AND EXISTS (SELECT 1 FROM events_before_macs listed
                        WHERE listed.aggregate_type = OLD.aggregate_type
                          AND listed.aggregate_id = OLD.aggregate_id
                          AND listed.sequence = OLD.sequence) THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
