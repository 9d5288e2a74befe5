-- A claim's id goes into the metadata of the events its command stores
-- (`idempotency_claim`), and `log_head` is the log's last position when the key was claimed.
-- A claim left without a response (a crash after the commit, a failure after it) is then
-- settled from the log alone: its events, if any, lie past that position.
ALTER TABLE idempotency_keys ADD COLUMN claim_id text;
ALTER TABLE idempotency_keys ADD COLUMN log_head bigint;
