-- Several categories (?1 is a JSON array): a scan in global order, filtered, stopped by the limit.
SELECT global_position, position, stream_name, type, id, time, data, metadata
FROM messages
WHERE global_position > ?2 AND category IN (SELECT value FROM json_each(?1))
ORDER BY global_position
LIMIT ?3
