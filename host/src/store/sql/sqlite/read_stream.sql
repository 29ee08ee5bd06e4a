SELECT global_position, position, stream_name, type, id, time, data, metadata FROM messages WHERE stream_name = ?1 AND position >= ?2 ORDER BY position
