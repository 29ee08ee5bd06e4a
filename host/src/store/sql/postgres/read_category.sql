-- One category: a range scan of messages_category, stopped by the limit.
FROM message_store.messages
WHERE message_store.category(stream_name) = $1 AND global_position > $2
ORDER BY global_position
LIMIT $3
