-- MessageDB's per-category write lock (message_store.acquire_lock), taken shared and in the writers'
-- sorted order: it waits for the appends in flight to these categories and holds new ones back until the
-- transaction ends, so the next statement's snapshot has no message of them still to come below another.
SELECT pg_advisory_xact_lock_shared(message_store.hash_64(c)) FROM unnest($1::text[]) AS c ORDER BY c
