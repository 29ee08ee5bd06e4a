SELECT key, id, due_ms, stream, message_type, data, metadata, state, settled_ms FROM schedules
WHERE key = ?1
