SELECT seq, target, next_attempt_at FROM protean.outbox WHERE status = 'pending' ORDER BY seq LIMIT $1
