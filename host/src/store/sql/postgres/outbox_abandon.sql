UPDATE protean.outbox SET attempts = attempts + 1, last_error = $2, status = 'abandoned' WHERE seq = $1
