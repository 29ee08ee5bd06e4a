-- Fire schedules still pending with the ids read; the keys returned are those fired. A firing racing
-- another (or a cancel, or a new set of the key) waits for its row and re-checks it once that commits.
UPDATE protean.schedules s SET state = 'fired', settled_ms = f.at_ms
FROM unnest($1::text[], $2::text[], $3::bigint[]) AS f (key, id, at_ms)
WHERE s.key = f.key AND s.id = f.id AND s.state = 'pending'
RETURNING s.key
