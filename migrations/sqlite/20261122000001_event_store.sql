-- The event store. `events` has exactly the shape sqlite-es reads and writes.
CREATE TABLE events
(
    aggregate_type text    NOT NULL,
    aggregate_id   text    NOT NULL,
    sequence       integer NOT NULL CHECK (sequence >= 1),
    event_type     text    NOT NULL,
    event_version  text    NOT NULL,
    payload        text    NOT NULL,
    metadata       text    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
) STRICT;

-- The global log. `position` is an explicit INTEGER PRIMARY KEY AUTOINCREMENT, so VACUUM
-- never renumbers it and it is never reused. SQLite admits one writer at a time and the
-- trigger runs inside the writing transaction, so position order is commit order.
CREATE TABLE event_log
(
    position       integer PRIMARY KEY AUTOINCREMENT,
    aggregate_type text    NOT NULL,
    aggregate_id   text    NOT NULL,
    sequence       integer NOT NULL,
    recorded_at    text    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    UNIQUE (aggregate_type, aggregate_id, sequence)
) STRICT;

CREATE TRIGGER events_log_position
    AFTER INSERT ON events
BEGIN
    INSERT INTO event_log (aggregate_type, aggregate_id, sequence)
    VALUES (NEW.aggregate_type, NEW.aggregate_id, NEW.sequence);
END;

CREATE TRIGGER events_refuse_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: UPDATE refused');
END;
CREATE TRIGGER events_refuse_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: DELETE refused');
END;
CREATE TRIGGER event_log_refuse_update BEFORE UPDATE ON event_log
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: UPDATE refused');
END;
CREATE TRIGGER event_log_refuse_delete BEFORE DELETE ON event_log
BEGIN
    SELECT RAISE(ABORT, 'events are append-only: DELETE refused');
END;

CREATE TABLE snapshots
(
    aggregate_type   text    NOT NULL,
    aggregate_id     text    NOT NULL,
    last_sequence    integer NOT NULL CHECK (last_sequence >= 0),
    current_snapshot integer NOT NULL CHECK (current_snapshot >= 0),
    payload          text    NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
) STRICT;

CREATE TABLE organization_keys
(
    organization_id text PRIMARY KEY,
    wrapped_key     blob NOT NULL,
    created_at      text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;

CREATE TABLE organization_slugs
(
    slug            text PRIMARY KEY,
    organization_id text NOT NULL,
    reserved_at     text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
CREATE INDEX organization_slugs_by_organization ON organization_slugs (organization_id);
