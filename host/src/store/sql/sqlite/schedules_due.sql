SELECT key, id, due_ms, stream, message_type, data, metadata, state, settled_ms FROM schedules
WHERE state = 'pending' AND due_ms <= ?1 ORDER BY due_ms, key LIMIT ?2
