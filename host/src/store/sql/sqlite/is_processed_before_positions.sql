-- Which of the identities in ?2 have a marker an older build wrote and the rekeying could not place
-- (markers_by_position.sql). Asked only while that table exists.
SELECT message_id FROM processed_before_positions
WHERE subscription = ?1 AND message_id IN (SELECT value FROM json_each(?2))
