-- The last message of one category: the end of its range in messages_category (bounded on both sides
-- and ordered as the index, for the reason given in read_category.sql).
SELECT global_position FROM message_store.messages
WHERE message_store.category(stream_name) >= $1 AND message_store.category(stream_name) <= $1
ORDER BY message_store.category(stream_name) DESC, global_position DESC
LIMIT 1
