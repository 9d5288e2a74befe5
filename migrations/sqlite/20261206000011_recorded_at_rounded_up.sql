-- SQLite's clock has milliseconds, and `strftime` cut the instant down to the one before it:
-- an event could read as recorded up to a millisecond before its command began
-- (`occurred_at`, microseconds), and the state as of its `recorded_at` left it out. Rounded up
-- instead, an event is never recorded before it occurred. Earlier rows keep their values.
DROP TRIGGER events_log_position;
CREATE TRIGGER events_log_position
    AFTER INSERT ON events
BEGIN
    INSERT INTO event_log (aggregate_type, aggregate_id, sequence, recorded_at)
    VALUES (NEW.aggregate_type, NEW.aggregate_id, NEW.sequence,
            strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '+0.001 seconds'));
END;
