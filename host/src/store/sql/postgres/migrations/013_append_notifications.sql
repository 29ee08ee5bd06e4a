-- Migration 13: every append, by any writer (a replica, a MessageDB client), notifies channel
-- `protean_appended` with the highest global position it appended, when its transaction commits. A
-- server listens and wakes its subscriptions and outbox at once, instead of at their next poll.
-- (PostgreSQL sends a transaction's notifications at its commit, and only then.)
CREATE FUNCTION message_store.notify_appended() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('protean_appended', (SELECT max(global_position) FROM inserted)::text);
    RETURN NULL;
END $$;

CREATE TRIGGER messages_notify_appended
    AFTER INSERT ON message_store.messages
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION message_store.notify_appended();
