-- The event store. The first seven columns are the ones postgres-es reads and writes.
CREATE TABLE events
(
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    sequence       bigint      NOT NULL CHECK (sequence >= 1),
    event_type     text        NOT NULL,
    event_version  text        NOT NULL,
    payload        jsonb       NOT NULL,
    metadata       jsonb       NOT NULL,
    -- Global position, assigned at insert. Positions are NOT commit order: a transaction that
    -- took a lower position may commit after a higher one. Readers of the whole log order by
    -- (transaction_id, position) and stay below the oldest transaction still in flight
    -- (pg_snapshot_xmin of the current snapshot), which never skips a late commit.
    position       bigint      GENERATED ALWAYS AS IDENTITY,
    transaction_id xid8        NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (aggregate_type, aggregate_id, sequence)
);
CREATE UNIQUE INDEX events_position ON events (position);
CREATE INDEX events_commit_order ON events (transaction_id, position);

CREATE FUNCTION events_are_append_only() RETURNS trigger
    LANGUAGE plpgsql AS
$$
BEGIN
    RAISE EXCEPTION 'events are append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER events_refuse_update_delete
    BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION events_are_append_only();
CREATE TRIGGER events_refuse_truncate
    BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_append_only();

-- One snapshot per aggregate (postgres-es updates it in place); payloads are sealed with the
-- organization's data key.
CREATE TABLE snapshots
(
    aggregate_type   text   NOT NULL,
    aggregate_id     text   NOT NULL,
    last_sequence    bigint NOT NULL CHECK (last_sequence >= 0),
    current_snapshot bigint NOT NULL CHECK (current_snapshot >= 0),
    payload          jsonb  NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id)
);

-- Per-organization data keys, wrapped by the master key. Purge deletes the row: that is what
-- makes the organization's personal data in events unreadable (crypto-shredding).
CREATE TABLE organization_keys
(
    organization_id text PRIMARY KEY,
    wrapped_key     bytea       NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- Slug reservations: the primary key makes two concurrent claims of one slug race-free
-- across processes.
CREATE TABLE organization_slugs
(
    slug            text PRIMARY KEY,
    organization_id text        NOT NULL,
    reserved_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX organization_slugs_by_organization ON organization_slugs (organization_id);
