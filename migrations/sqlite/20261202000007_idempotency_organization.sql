-- The organization a stored command response belongs to, so that its purge can erase the
-- responses too: they can hold the organization's personal data.
ALTER TABLE idempotency_keys ADD COLUMN organization_id text;
CREATE INDEX idempotency_keys_by_organization ON idempotency_keys (organization_id);
