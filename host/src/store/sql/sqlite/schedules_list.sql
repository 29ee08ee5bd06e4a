SELECT key, id, due_ms, stream, message_type, data, metadata, state, settled_ms FROM schedules
WHERE ?1 IS NULL OR state = ?1 ORDER BY due_ms, key LIMIT ?2
