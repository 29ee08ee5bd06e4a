-- Every marker or none, as one statement (a transaction of its own): a marker that exists means
-- another consumer committed the message first, and fails the statement whole (unique_violation).
INSERT INTO protean.processed (subscription, message_id, build_id)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
