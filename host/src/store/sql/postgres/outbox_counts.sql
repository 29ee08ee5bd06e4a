SELECT status, count(*) FROM protean.outbox GROUP BY status
