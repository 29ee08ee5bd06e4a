-- Migration 19: the read of several categories (migration 15) scans messages_category from (category,
-- after) for each category, whatever the planner's statistics say. Written as
-- `category = c AND global_position > after ORDER BY global_position`, the planner could take the
-- primary key's order and filter by category instead: at the head of categories that had gone quiet,
-- each read then went through every message appended to other categories since (300,000 rows, 100 ms,
-- in a store where the index answers in 6 buffers). Bounded on both sides (>= and <=, which for text is
-- =) and ordered as the index, (category, global_position), only the index gives that order. Same
-- signature and answers as before: servers of older builds call it unchanged.
CREATE OR REPLACE FUNCTION protean.read_categories_shared(
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
        WHERE message_store.category(s.stream_name) >= c.category
          AND message_store.category(s.stream_name) <= c.category
          AND s.global_position > after
        ORDER BY message_store.category(s.stream_name), s.global_position
        LIMIT max_rows
    ) AS m
    ORDER BY m.global_position
    LIMIT max_rows;
END $$;
