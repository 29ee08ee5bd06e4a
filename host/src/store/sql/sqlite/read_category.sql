-- One category: a range scan of messages_category, stopped by the limit.
SELECT global_position, position, stream_name, type, id, time, data, metadata
FROM messages
WHERE category = ?1 AND global_position > ?2
ORDER BY global_position
LIMIT ?3
