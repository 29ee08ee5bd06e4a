-- Not OR IGNORE: a marker that exists means another consumer committed the message first, and this
-- unit must not commit its effects a second time.
INSERT INTO processed (subscription, global_position, message_id, build_id, processed_at)
VALUES (?1, ?2, ?3, ?4, ?5)
