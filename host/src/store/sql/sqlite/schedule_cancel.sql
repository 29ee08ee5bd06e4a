-- Cancel a key's schedule if it is pending: a fired one stays fired.
UPDATE schedules SET state = 'cancelled', settled_ms = ?2 WHERE key = ?1 AND state = 'pending'
