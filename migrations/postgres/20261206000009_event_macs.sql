-- Each event's HMAC-SHA256 under a key derived from the master key (src/store/authenticity.rs):
-- `orgledger verify` sees an event altered, moved or written without that key. Events stored
-- before this migration have none.
ALTER TABLE events ADD COLUMN mac bytea CHECK (octet_length(mac) = 32);
