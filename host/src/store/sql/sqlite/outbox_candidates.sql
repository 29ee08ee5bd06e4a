SELECT seq, target, next_attempt_at FROM outbox WHERE status = 'pending' ORDER BY seq LIMIT ?1
