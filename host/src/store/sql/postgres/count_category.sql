-- A subscription's lag in one category: counted on messages_category (bounded and ordered as in
-- read_category.sql), nothing read but the index and the visibility map.
SELECT count(*) FROM message_store.messages
WHERE message_store.category(stream_name) >= $1 AND message_store.category(stream_name) <= $1
  AND global_position > $2
