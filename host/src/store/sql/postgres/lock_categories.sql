-- MessageDB's per-category write lock (see message_store.acquire_lock), taken in sorted order (a
-- volatile call is evaluated after the sort); the categories' hashes are recorded for the transaction,
-- so that the append's guard (migration 14) need not look for the locks in pg_locks.
WITH locked AS (
    SELECT message_store.hash_64(c) AS k, pg_advisory_xact_lock(message_store.hash_64(c))
    FROM unnest($1::text[]) AS c
    ORDER BY c
)
SELECT set_config('protean.category_locks', ',' || string_agg(k::text, ',') || ',', true)
FROM locked
