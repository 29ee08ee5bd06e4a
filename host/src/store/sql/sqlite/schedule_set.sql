-- Set a key's schedule, replacing whatever it named (fired, cancelled or pending): pending again.
INSERT INTO schedules (key, id, due_ms, stream, message_type, data, metadata, state, settled_ms)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', NULL)
ON CONFLICT (key) DO UPDATE SET
    id = excluded.id, due_ms = excluded.due_ms, stream = excluded.stream,
    message_type = excluded.message_type, data = excluded.data, metadata = excluded.metadata,
    state = 'pending', settled_ms = NULL
