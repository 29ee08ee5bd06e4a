-- A unit's messages in one statement; global positions are drawn in row order.
INSERT INTO message_store.messages (id, stream_name, position, type, data, metadata, time)
SELECT id::uuid, stream_name, position, type, data::jsonb, metadata::jsonb,
       time::timestamptz AT TIME ZONE 'utc'
FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], $6::text[], $7::text[])
    AS t (id, stream_name, position, type, data, metadata, time)
RETURNING global_position
