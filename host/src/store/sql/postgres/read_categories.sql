-- Several categories in one statement, so one snapshot: a range scan of messages_category per category,
-- each stopped by the limit, merged in global order.
FROM unnest($1::text[]) AS c(category)
CROSS JOIN LATERAL (
    SELECT * FROM message_store.messages AS m
    WHERE message_store.category(m.stream_name) = c.category AND m.global_position > $2
    ORDER BY m.global_position
    LIMIT $3
) AS messages
ORDER BY global_position
LIMIT $3
