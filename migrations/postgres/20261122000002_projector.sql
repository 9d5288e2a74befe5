-- Where each projection stands. The row is locked by every batch, so its read-model changes
-- and its checkpoint move in one transaction.
CREATE TABLE projection_checkpoints
(
    name           text PRIMARY KEY,
    commit_txid    bigint NOT NULL DEFAULT 0,
    position       bigint NOT NULL DEFAULT 0,
    events_applied bigint NOT NULL DEFAULT 0,
    updated_at_us  bigint NOT NULL DEFAULT 0,
    failed_at_us   bigint,
    failed_event   text,
    last_error     text
);

-- The last sequence of each organization a projection has applied: the read-your-writes
-- token, and a guard that makes applying an event twice a no-op.
CREATE TABLE projected_versions
(
    projection      text   NOT NULL,
    organization_id text   NOT NULL,
    version         bigint NOT NULL,
    PRIMARY KEY (projection, organization_id)
);
CREATE INDEX projected_versions_by_organization ON projected_versions (organization_id);

-- Wakes projectors in every process when events are committed (delivered at commit).
CREATE FUNCTION notify_events() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    PERFORM pg_notify('orgledger_events', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER events_notify
    AFTER INSERT ON events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_events();
