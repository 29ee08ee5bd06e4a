global_position, position, stream_name, type, id::text,
to_char(time, 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'), coalesce(data::text, '{}'), coalesce(metadata::text, '{}')
