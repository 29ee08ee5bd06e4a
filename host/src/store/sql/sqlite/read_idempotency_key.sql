SELECT message_id FROM idempotency_keys WHERE key = ?1
