-- MessageDB's per-category write lock (see message_store.acquire_lock), taken in sorted order.
SELECT pg_advisory_xact_lock(message_store.hash_64(c)) FROM unnest($1::text[]) AS c ORDER BY c
