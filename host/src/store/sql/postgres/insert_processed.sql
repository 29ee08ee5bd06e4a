-- A marker that exists means another consumer committed the message first: the caller compares the
-- rows inserted with the markers given and rolls the unit back when they differ.
INSERT INTO protean.processed (subscription, message_id, build_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT DO NOTHING
