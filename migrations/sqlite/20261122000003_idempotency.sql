-- Responses of commands sent with an Idempotency-Key, replayed for 24 hours. A row without
-- completed_at_us is a request still in flight.
CREATE TABLE idempotency_keys
(
    scope           text   NOT NULL,
    key             text   NOT NULL,
    fingerprint     text   NOT NULL,
    status          integer,
    content_type    text,
    etag            text,
    consistency     text,
    body            blob,
    created_at_us   integer NOT NULL,
    completed_at_us integer,
    PRIMARY KEY (scope, key)
) STRICT;
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at_us);
