-- Cancel keys' schedules that are pending (one row per key): a fired one stays fired.
UPDATE protean.schedules s SET state = 'cancelled', settled_ms = c.at_ms
FROM unnest($1::text[], $2::bigint[]) AS c (key, at_ms)
WHERE s.key = c.key AND s.state = 'pending'
