-- Each event's HMAC-SHA256 under a key derived from the master key (src/store/authenticity.rs):
-- `orgledger verify` names an event altered, moved or written without that key.
ALTER TABLE events ADD COLUMN mac blob CHECK (length(mac) = 32);

-- One update becomes possible: giving an event stored before MACs its MAC (`orgledger migrate
-- --authenticate-unmarked-events`). Nothing else of the row may change with it (every column
-- is compared: a column added to `events` must be added here), and a MAC once set never
-- changes.
DROP TRIGGER events_refuse_update;
CREATE TRIGGER events_refuse_update BEFORE UPDATE ON events
    WHEN NOT (OLD.mac IS NULL AND NEW.mac IS NOT NULL
              AND NEW.aggregate_type IS OLD.aggregate_type
              AND NEW.aggregate_id IS OLD.aggregate_id
              AND NEW.sequence IS OLD.sequence
              AND NEW.event_type IS OLD.event_type
              AND NEW.event_version IS OLD.event_version
              AND NEW.payload IS OLD.payload
              AND NEW.metadata IS OLD.metadata)
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: UPDATE refused');
END;
