CREATE TABLE projection_checkpoints
(
    name           text PRIMARY KEY,
    commit_txid    integer NOT NULL DEFAULT 0,
    position       integer NOT NULL DEFAULT 0,
    events_applied integer NOT NULL DEFAULT 0,
    updated_at_us  integer NOT NULL DEFAULT 0,
    failed_at_us   integer,
    failed_event   text,
    last_error     text
) STRICT;

CREATE TABLE projected_versions
(
    projection      text    NOT NULL,
    organization_id text    NOT NULL,
    version         integer NOT NULL,
    PRIMARY KEY (projection, organization_id)
) STRICT;
CREATE INDEX projected_versions_by_organization ON projected_versions (organization_id);
