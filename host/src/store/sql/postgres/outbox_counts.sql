-- The rows waiting to be published, by how they fare: the partial index of pending rows serves it, so
-- that its cost is the backlog's, however many rows were published before.
SELECT count(*), count(*) FILTER (WHERE attempts > 0), count(*) FILTER (WHERE attempts >= $1)
FROM protean.outbox WHERE status = 'pending'
