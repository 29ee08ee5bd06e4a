SELECT status, count(*), count(*) FILTER (WHERE attempts > 0), count(*) FILTER (WHERE attempts >= $1)
FROM protean.outbox GROUP BY status
