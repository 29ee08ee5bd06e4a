-- Migration 4: an append that does not hold its category's MessageDB lock is refused.
--
-- Subscriptions of several categories read them under those locks (share_categories.sql), which is what
-- keeps a position from passing a message still to become visible below it. That holds for every writer
-- that draws its global position under the category's lock: message_store.write_message (MessageDB
-- clients, Python Protean) and protean-host itself. A plain INSERT without the lock could commit below
-- a position already read past and never be handled; it fails here instead, loudly, naming the fix.
CREATE FUNCTION message_store.require_category_lock() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    _category varchar;
    _key bigint;
BEGIN
    FOR _category IN SELECT DISTINCT message_store.category(stream_name) FROM inserted LOOP
        _key := message_store.hash_64(_category);
        -- pg_locks shows a bigint advisory key as its two unsigned halves (classid, objid; objsubid 1).
        IF NOT EXISTS (
            SELECT 1 FROM pg_locks
            WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
              AND mode = 'ExclusiveLock' AND objsubid = 1
              AND classid::bigint = ((_key >> 32) & 4294967295)
              AND objid::bigint = (_key & 4294967295)
        ) THEN
            RAISE EXCEPTION 'message of category % appended without the category''s lock: subscriptions could miss it', _category
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'append with message_store.write_message, or take pg_advisory_xact_lock(message_store.hash_64(category)) before the INSERT';
        END IF;
    END LOOP;
    RETURN NULL;
END $$;

CREATE TRIGGER messages_require_category_lock
    AFTER INSERT ON message_store.messages
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION message_store.require_category_lock();
