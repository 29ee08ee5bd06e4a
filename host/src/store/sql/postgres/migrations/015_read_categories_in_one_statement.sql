-- Migration 15: a read of several categories in one round trip (it was five: BEGIN, the lock timeout,
-- the shared locks, the read, COMMIT). A process manager reads its categories this way before every
-- batch. Called as a statement of its own, so that its locks end with it.
--
-- Appends to different categories commit in any order (MessageDB clients take only their category's
-- lock), so a message can become visible below one already seen. The function first takes the
-- categories' write locks shared, in the writers' sorted order: that waits for the appends in flight to
-- them and holds new ones back until it returns. Then it reads, in a statement of its own: PL/pgSQL
-- takes a new snapshot for each statement of a volatile function under READ COMMITTED, so the read sees
-- every append committed before the locks were granted, and none can commit below it meanwhile. A
-- writer that takes the locks in another order could deadlock with the wait, so the wait gives up after
-- `lock_wait` (below PostgreSQL's deadlock_timeout; the caller tries again).
CREATE FUNCTION protean.read_categories_shared(
    categories text[], after bigint, max_rows bigint, lock_wait text
) RETURNS SETOF message_store.messages LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM set_config('lock_timeout', lock_wait, true);
    -- A volatile call in the select list is evaluated after the sort.
    PERFORM pg_advisory_xact_lock_shared(message_store.hash_64(c))
    FROM unnest(categories) AS c ORDER BY c;
    -- A range scan of messages_category per category, each stopped by the limit, merged in global
    -- order.
    RETURN QUERY
    SELECT m.* FROM unnest(categories) AS c(category)
    CROSS JOIN LATERAL (
        SELECT * FROM message_store.messages AS s
        WHERE message_store.category(s.stream_name) = c.category AND s.global_position > after
        ORDER BY s.global_position
        LIMIT max_rows
    ) AS m
    ORDER BY m.global_position
    LIMIT max_rows;
END $$;
