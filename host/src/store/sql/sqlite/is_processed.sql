SELECT 1 FROM processed WHERE subscription = ?1 AND message_id = ?2
