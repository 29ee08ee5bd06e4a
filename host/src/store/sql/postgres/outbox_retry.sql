UPDATE protean.outbox SET attempts = attempts + 1, last_error = $2, next_attempt_at = $3 WHERE seq = $1
