-- Each event's HMAC-SHA256 under a key derived from the master key (src/store/authenticity.rs):
-- `orgledger verify` names an event altered, moved or written without that key. The check is
-- NOT VALID so that adding it reads none of the existing rows (all without a MAC); new and
-- updated rows are checked.
ALTER TABLE events ADD COLUMN mac bytea;
ALTER TABLE events ADD CONSTRAINT events_mac_length CHECK (octet_length(mac) = 32) NOT VALID;

-- One update becomes possible: giving an event stored before MACs its MAC (`orgledger migrate
-- --authenticate-unmarked-events`). Nothing else of the row may change with it, and a MAC once
-- set never changes.
CREATE OR REPLACE FUNCTION events_are_append_only() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF OLD.mac IS NULL AND NEW.mac IS NOT NULL
           AND to_jsonb(NEW) - 'mac' = to_jsonb(OLD) - 'mac' THEN
            RETURN NEW;
        END IF;
    END IF;
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
