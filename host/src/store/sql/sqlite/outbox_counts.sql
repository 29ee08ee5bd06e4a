-- The rows waiting to be published, by how they fare: read through the index of pending rows, so that
-- its cost is the backlog's, however many rows were published before.
SELECT COUNT(*), COALESCE(SUM(attempts > 0), 0), COALESCE(SUM(attempts >= ?1), 0)
FROM outbox INDEXED BY outbox_pending WHERE status = 'pending'
