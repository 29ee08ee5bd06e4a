WHERE state = 'pending' AND due_ms <= $1 ORDER BY due_ms, key LIMIT $2
