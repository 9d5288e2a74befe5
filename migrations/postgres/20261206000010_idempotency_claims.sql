-- A claim's id goes into the metadata of the events its command stores
-- (`idempotency_claim`). A claim left without a response (a crash after the commit, a failure
-- after it) is then settled from the log alone: its events, if any, carry its id. Only keyed
-- commands' events are in the index.
ALTER TABLE idempotency_keys ADD COLUMN claim_id text;
CREATE INDEX events_by_idempotency_claim ON events ((metadata->>'idempotency_claim'))
    WHERE metadata ? 'idempotency_claim';
