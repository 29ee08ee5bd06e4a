-- No row inserted means the key was committed before: the caller refuses the unit.
INSERT INTO idempotency_keys (key, message_id, committed_at) VALUES (?1, ?2, ?3) ON CONFLICT (key) DO NOTHING
