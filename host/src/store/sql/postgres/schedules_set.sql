-- Set keys' schedules (one row per key), replacing whatever each named.
INSERT INTO protean.schedules (key, id, due_ms, stream, message_type, data, metadata, state, settled_ms)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::text[], $9::bigint[])
ON CONFLICT (key) DO UPDATE SET
    id = excluded.id, due_ms = excluded.due_ms, stream = excluded.stream,
    message_type = excluded.message_type, data = excluded.data, metadata = excluded.metadata,
    state = excluded.state, settled_ms = excluded.settled_ms
