SELECT message_id FROM protean.processed WHERE subscription = $1 AND message_id = ANY($2::text[])
