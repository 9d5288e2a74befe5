-- The platform token `serve` generates when none is configured, kept beside the data: on
-- PostgreSQL that is the database, which every process serving it shares, whatever its
-- working directory. Only the token's SHA-256: the token is printed once and never stored.
CREATE TABLE generated_platform_token (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    token_sha256 TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
