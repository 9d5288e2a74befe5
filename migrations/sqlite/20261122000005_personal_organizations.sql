-- One personal organization per user. The primary key makes concurrent creates race-free;
-- a claim whose organization never got an event (a crashed create) is taken over.
CREATE TABLE personal_organizations
(
    user_id         text PRIMARY KEY,
    organization_id text NOT NULL,
    claimed_at      text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
) STRICT;
