-- Markers by identity alone (checks and tools; the engine looks up by global position, in
-- is_processed_keyed.sql): a scan of the subscription's markers.
SELECT message_id FROM processed WHERE subscription = ?1 AND message_id IN (SELECT value FROM json_each(?2))
