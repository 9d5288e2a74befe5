-- The NOTIFY that wakes other processes' projectors is sent after an append commits, from
-- its own asynchronously committed transaction (`Projector::committed`), no longer by a
-- trigger inside the append: PostgreSQL holds a cluster-wide lock from a notifying
-- transaction's pre-commit until its commit record is flushed, so every append committed
-- alone and group commit was lost (pgbench, one-row INSERTs at 32 clients: 4,300 to 7,200
-- commits/s without such a trigger, 1,300 to 1,900 with it, which is the one-client rate).
DROP TRIGGER events_notify ON events;
DROP FUNCTION notify_events();
