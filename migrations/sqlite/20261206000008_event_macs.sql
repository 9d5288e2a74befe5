-- Each event's HMAC-SHA256 under a key derived from the master key (src/store/authenticity.rs):
-- `orgledger verify` names an event altered, moved or written without that key.
ALTER TABLE events ADD COLUMN mac blob CHECK (length(mac) = 32);

-- The events stored before MACs, listed as the column is added: the only rows that may later
-- be given a MAC (`orgledger migrate --authenticate-legacy-events`). Nothing may change the
-- list, so a row written since cannot pass for one of them.
CREATE TABLE events_before_macs
(
    aggregate_type text    NOT NULL,
    aggregate_id   text    NOT NULL,
    sequence       integer NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;
INSERT INTO events_before_macs (aggregate_type, aggregate_id, sequence)
SELECT aggregate_type, aggregate_id, sequence FROM events;
CREATE TRIGGER events_before_macs_refuse_insert BEFORE INSERT ON events_before_macs
BEGIN
    SELECT RAISE(ABORT, 'the events stored before MACs are fixed: INSERT refused');
END;
CREATE TRIGGER events_before_macs_refuse_update BEFORE UPDATE ON events_before_macs
BEGIN
    SELECT RAISE(ABORT, 'the events stored before MACs are fixed: UPDATE refused');
END;
CREATE TRIGGER events_before_macs_refuse_delete BEFORE DELETE ON events_before_macs
BEGIN
    SELECT RAISE(ABORT, 'the events stored before MACs are fixed: DELETE refused');
END;

-- One update becomes possible: giving a listed event its MAC. Nothing else of the row may
-- change with it (every column is compared: a column added to `events` must be added here),
-- and a MAC once set never changes.
DROP TRIGGER events_refuse_update;
CREATE TRIGGER events_refuse_update BEFORE UPDATE ON events
    WHEN NOT (OLD.mac IS NULL AND NEW.mac IS NOT NULL
              AND NEW.aggregate_type IS OLD.aggregate_type
              AND NEW.aggregate_id IS OLD.aggregate_id
              AND NEW.sequence IS OLD.sequence
              AND NEW.event_type IS OLD.event_type
              AND NEW.event_version IS OLD.event_version
              AND NEW.payload IS OLD.payload
              AND NEW.metadata IS OLD.metadata
              AND EXISTS (SELECT 1 FROM events_before_macs listed
                           WHERE listed.aggregate_type = OLD.aggregate_type
                             AND listed.aggregate_id = OLD.aggregate_id
                             AND listed.sequence = OLD.sequence))
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: UPDATE refused');
END;
