SELECT message_id FROM protean.idempotency_keys WHERE key = $1
