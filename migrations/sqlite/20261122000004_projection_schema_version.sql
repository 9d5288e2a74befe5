-- The read-model schema version each projection's tables were built with; a projection
-- whose code moved to a newer version drops its tables and replays the log at start-up.
ALTER TABLE projection_checkpoints ADD COLUMN schema_version integer NOT NULL DEFAULT 1;
