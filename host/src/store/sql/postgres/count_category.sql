-- A subscription's lag in one category: a count over its range of messages_category (the category
-- bounded on both sides, as in read_category.sql); no message's text is read.
SELECT count(*) FROM message_store.messages
WHERE message_store.category(stream_name) >= $1 AND message_store.category(stream_name) <= $1
  AND global_position > $2
