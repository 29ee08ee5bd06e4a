-- Migration 14: the category-lock guard (migration 4) without a scan of pg_locks for the host's own
-- appends. Scanning pg_locks costs milliseconds per appending statement, and an append runs under the
-- store-wide append lock, so every other append waited for it too. The host's lock statement
-- (lock_categories.sql) records the hashes of the categories it locked in the transaction-local
-- setting protean.category_locks (',h1,h2,'); a category found there passes at once. Every other
-- writer (message_store.write_message, a client taking pg_advisory_xact_lock itself, a plain INSERT) is
-- judged from pg_locks as before.
CREATE OR REPLACE FUNCTION message_store.require_category_lock() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    _category varchar;
    _key bigint;
    _recorded text := current_setting('protean.category_locks', true);
BEGIN
    FOR _category IN SELECT DISTINCT message_store.category(stream_name) FROM inserted LOOP
        _key := message_store.hash_64(_category);
        CONTINUE WHEN _recorded IS NOT NULL AND strpos(_recorded, ',' || _key || ',') > 0;
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
