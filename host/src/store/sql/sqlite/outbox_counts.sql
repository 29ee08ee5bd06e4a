SELECT status, COUNT(*), COALESCE(SUM(attempts > 0), 0), COALESCE(SUM(attempts >= ?1), 0)
FROM outbox GROUP BY status
