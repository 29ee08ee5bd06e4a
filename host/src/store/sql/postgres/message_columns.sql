global_position, position, stream_name, type,
-- The message id is Protean's metadata.headers.id; a row written by a MessageDB client without one falls
-- back to the row's own uuid.
coalesce(metadata #>> '{headers,id}', id::text),
to_char(time, 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'), coalesce(data::text, '{}'), coalesce(metadata::text, '{}')
