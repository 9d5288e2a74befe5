-- A snapshot's sealed state is stored as the raw ciphertext (`state`, a blob) instead of
-- base64 text inside a JSON `payload` (see the PostgreSQL migration of the same name).
-- Snapshots written before stay readable in `payload`; the next one replaces them. Processes
-- of the older version must be stopped first (ARCHITECTURE.md, Upgrading). SQLite
-- cannot drop a NOT NULL in place, so the table is rebuilt.
CREATE TABLE snapshots_with_state
(
    aggregate_type   text    NOT NULL,
    aggregate_id     text    NOT NULL,
    last_sequence    integer NOT NULL CHECK (last_sequence >= 0),
    current_snapshot integer NOT NULL CHECK (current_snapshot >= 0),
    payload          text,
    state            blob,
    PRIMARY KEY (aggregate_type, aggregate_id),
    CHECK ((payload IS NULL) <> (state IS NULL))
) STRICT;
INSERT INTO snapshots_with_state (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload)
SELECT aggregate_type, aggregate_id, last_sequence, current_snapshot, payload FROM snapshots;
DROP TABLE snapshots;
ALTER TABLE snapshots_with_state RENAME TO snapshots;
