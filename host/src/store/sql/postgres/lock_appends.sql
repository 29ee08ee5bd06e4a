-- An append's locks, in one statement (they are held until the commit, so every round trip between
-- them and the COMMIT is a wait for the next appender):
-- - first, the store-wide append lock, which serialises the host's appends as SQLite's write lock does:
--   global positions then become visible in order, so a subscription that has read past a position
--   never misses a message committed later with a smaller one. (MessageDB clients serialise only per
--   category; see docs/architecture.md.) The sort below reads the `appends` row, so it is taken before
--   any category lock, in the same order by every host writer;
-- - then MessageDB's per-category write locks (see message_store.acquire_lock), in sorted order (a
--   volatile call is evaluated after the sort); the categories' hashes are recorded for the
--   transaction, so that the append's guard (migration 14) need not look for the locks in pg_locks.
WITH appends AS MATERIALIZED (
    SELECT pg_advisory_xact_lock(7362836200114529281)
),
locked AS (
    SELECT message_store.hash_64(c) AS k, pg_advisory_xact_lock(message_store.hash_64(c))
    FROM appends, unnest($1::text[]) AS c
    ORDER BY c
)
SELECT set_config('protean.category_locks', ',' || string_agg(k::text, ',') || ',', true)
FROM locked
