-- Processed markers of a file an older build made, rekeyed by global position (see schema.sql). Run
-- once, inside the schema transaction, after the old table was renamed processed_before_positions and
-- the schema made the new one. A marker names its message's identity, `{stream}@{position}` (digits
-- after the last `@`): a marker of a message of this store moves to the new table, under that
-- message's global position. Any other (a broker entry this store does not hold, the id of an entry
-- without positions) stays where it is, by identity, where every lookup and insert also looks while
-- the table has rows.
CREATE TEMP TABLE placed AS
WITH split AS (
    -- `head` is the identity without its trailing digits: `{stream}@` for an identity.
    SELECT p.*, rtrim(p.message_id, '0123456789') AS head
    FROM processed_before_positions AS p
)
SELECT s.subscription, m.global_position, s.message_id, s.build_id, s.processed_at
FROM split AS s
JOIN messages AS m
    ON length(s.head) < length(s.message_id)
   AND substr(s.head, -1) = '@'
   AND m.stream_name = substr(s.head, 1, length(s.head) - 1)
   AND m.position = CAST(substr(s.message_id, length(s.head) + 1) AS INTEGER);
INSERT INTO processed (subscription, global_position, message_id, build_id, processed_at)
SELECT * FROM placed;
DELETE FROM processed_before_positions
WHERE (subscription, message_id) IN (SELECT subscription, message_id FROM placed);
DROP TABLE placed;
