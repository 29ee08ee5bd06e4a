UPDATE protean.outbox SET next_attempt_at = 0
WHERE status = 'pending' AND next_attempt_at <> 0 AND ($1::text IS NULL OR target = $1)
