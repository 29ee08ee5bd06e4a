SELECT message_id FROM processed WHERE subscription = ?1 AND message_id IN (SELECT value FROM json_each(?2))
