-- Migration 19: the read of several categories (migration 15) scans messages_category from (category,
-- after) for each category, whatever the planner's statistics say. Written as
-- `category = c AND global_position > after ORDER BY global_position`, the planner could take the
-- primary key's order and filter by category instead: at the head of categories that had gone quiet,
-- each read then went through every message appended to other categories since (300,000 rows, 100 ms,
-- in a store where the index answers in 6 buffers). Bounded on both sides (>= and <=, which for text is
-- =) and ordered as the index, (category, global_position), only the index gives that order. Same
-- signature and answers as before: servers of older builds call it unchanged. MessageDB's
-- get_category_messages gets the same change below, when it is the copy migration 1 installed.
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

-- MessageDB's get_category_messages, which MessageDB clients poll (Python Protean's subscriptions among
-- them), has the same shape. The copy migration 1 installed is rewritten the same way, with the same
-- signature and answers; the function of a MessageDB install that migration 1 adopted is not ours to
-- change, and is left as it is.
DO $adopt$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_proc AS p JOIN pg_namespace AS n ON n.oid = p.pronamespace
        WHERE n.nspname = 'message_store' AND p.proname = 'get_category_messages'
          AND p.prosrc LIKE '%WHERE message_store.category(stream_name) = $1 AND global_position >= $2%'
    ) THEN
        RETURN;
    END IF;
    EXECUTE $fn$
CREATE OR REPLACE FUNCTION message_store.get_category_messages(
    category varchar, "position" bigint DEFAULT 1, batch_size bigint DEFAULT 1000,
    correlation varchar DEFAULT NULL, consumer_group_member bigint DEFAULT NULL,
    consumer_group_size bigint DEFAULT NULL, condition varchar DEFAULT NULL
) RETURNS SETOF message_store.message LANGUAGE plpgsql AS $$
DECLARE
    _command text;
BEGIN
    IF NOT message_store.is_category(get_category_messages.category) THEN
        RAISE EXCEPTION 'Must be a category: %', get_category_messages.category;
    END IF;
    _command := 'SELECT id::varchar, stream_name::varchar, type::varchar, position::bigint,
        global_position::bigint, data::varchar, metadata::varchar, time::timestamp
        FROM message_store.messages
        WHERE message_store.category(stream_name) >= $1 AND message_store.category(stream_name) <= $1
          AND global_position >= $2';
    IF get_category_messages.correlation IS NOT NULL THEN
        IF position('-' IN get_category_messages.correlation) > 0 THEN
            RAISE EXCEPTION 'Correlation must be a category (Correlation: %)', get_category_messages.correlation;
        END IF;
        _command := _command || ' AND message_store.category(metadata->>''correlationStreamName'') = $4';
    END IF;
    IF get_category_messages.consumer_group_member IS NOT NULL
       OR get_category_messages.consumer_group_size IS NOT NULL THEN
        IF get_category_messages.consumer_group_member IS NULL
           OR get_category_messages.consumer_group_size IS NULL
           OR get_category_messages.consumer_group_size < 1
           OR get_category_messages.consumer_group_member < 0
           OR get_category_messages.consumer_group_member >= get_category_messages.consumer_group_size THEN
            RAISE EXCEPTION 'Invalid consumer group (Member: %, Size: %)',
                get_category_messages.consumer_group_member, get_category_messages.consumer_group_size;
        END IF;
        _command := _command || ' AND MOD(@message_store.hash_64(message_store.cardinal_id(stream_name)), $6) = $5';
    END IF;
    IF get_category_messages.condition IS NOT NULL THEN
        IF current_setting('message_store.sql_condition', true) IS DISTINCT FROM 'on' THEN
            RAISE EXCEPTION 'Retrieval with SQL condition is not activated';
        END IF;
        _command := _command || ' AND (' || get_category_messages.condition || ')';
    END IF;
    _command := _command || ' ORDER BY message_store.category(stream_name), global_position ASC';
    IF coalesce(get_category_messages.batch_size, 1000) != -1 THEN
        _command := _command || ' LIMIT $3';
    END IF;
    RETURN QUERY EXECUTE _command USING get_category_messages.category,
        coalesce(get_category_messages.position, 1), coalesce(get_category_messages.batch_size, 1000),
        get_category_messages.correlation, get_category_messages.consumer_group_member,
        get_category_messages.consumer_group_size;
END $$
    $fn$;
END $adopt$;
