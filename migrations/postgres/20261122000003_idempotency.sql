-- Responses of commands sent with an Idempotency-Key, replayed for 24 hours. A row without
-- completed_at_us is a request still in flight.
CREATE TABLE idempotency_keys
(
    scope           text   NOT NULL,
    key             text   NOT NULL,
    fingerprint     text   NOT NULL,
    status          bigint,
    content_type    text,
    etag            text,
    consistency     text,
    body            bytea,
    created_at_us   bigint NOT NULL,
    completed_at_us bigint,
    PRIMARY KEY (scope, key)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at_us);
