INSERT INTO protean.processed (subscription, message_id, build_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT DO NOTHING
