-- A snapshot replaced by a later one is kept, so that a past moment (`GET .../state`) starts
-- from the nearest snapshot at or before it instead of the first event (see the PostgreSQL
-- migration of the same name). Snapshots in the older `payload` form are not kept; a `state`
-- sealed before snapshots named their event is kept but never used. A purge deletes an
-- organization's kept snapshots before its key. A later migration that rebuilds `snapshots`
-- (as migration 6 did) drops this trigger with it, and must create it again.
CREATE TABLE past_snapshots
(
    aggregate_type text    NOT NULL,
    aggregate_id   text    NOT NULL,
    last_sequence  integer NOT NULL CHECK (last_sequence > 0),
    state          blob    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
) STRICT;

CREATE TRIGGER snapshots_keep_past
    AFTER UPDATE ON snapshots
    FOR EACH ROW
    WHEN OLD.state IS NOT NULL AND OLD.last_sequence > 0 AND OLD.last_sequence < NEW.last_sequence
BEGIN
    INSERT OR IGNORE INTO past_snapshots (aggregate_type, aggregate_id, last_sequence, state)
    VALUES (OLD.aggregate_type, OLD.aggregate_id, OLD.last_sequence, OLD.state);
END;
