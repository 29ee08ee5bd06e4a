-- No row inserted means the key was committed before: the caller refuses the unit. A transaction in
-- flight with the same key makes this wait for it.
INSERT INTO protean.idempotency_keys (key, message_id) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING
