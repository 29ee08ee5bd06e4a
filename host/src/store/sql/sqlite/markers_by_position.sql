-- Processed markers of a file an older build made, rekeyed by global position (see schema.sql). Run
-- once, inside the schema transaction, after the old table was renamed processed_before_positions and
-- the schema made the new one. A marker names its message's identity, `{stream}@{position}` (digits
-- after the last `@`): a marker of a message of this store moves to the new table, under that
-- message's global position. Any other (a broker entry this store does not hold, the id of an entry
-- without positions) stays where it is, by identity, where every lookup and insert also looks while
-- the table has rows.
CREATE TEMP TABLE placed AS
SELECT p.subscription, m.global_position, p.message_id, p.build_id, p.processed_at
FROM processed_before_positions AS p
JOIN messages AS m
    ON length(rtrim(p.message_id, '0123456789')) < length(p.message_id)
   AND substr(rtrim(p.message_id, '0123456789'), -1) = '@'
   AND m.stream_name = substr(p.message_id, 1, length(rtrim(p.message_id, '0123456789')) - 1)
   AND m.position = CAST(substr(p.message_id, length(rtrim(p.message_id, '0123456789')) + 1) AS INTEGER);
INSERT INTO processed (subscription, global_position, message_id, build_id, processed_at)
SELECT * FROM placed;
DELETE FROM processed_before_positions
WHERE (subscription, message_id) IN (SELECT subscription, message_id FROM placed);
DROP TABLE placed;
