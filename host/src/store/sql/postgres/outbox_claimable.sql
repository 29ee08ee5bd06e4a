-- What an outbox claim judges, in one statement (so one round trip and one snapshot), as rows of
-- (kind, seq, target, worker, at): the database's clock ('clock', at = now in unix ms: leases are
-- judged by the one clock every replica shares), the oldest pending rows, up to $1, passing over the
-- rows $2..=$3 (the longest run the worker has in flight; an empty range when none) ('row', at = when
-- the row may next be tried), and every target's lease ('lease', at = when it ends).
SELECT 'clock', NULL::bigint, NULL::text, NULL::text,
       (extract(epoch FROM clock_timestamp()) * 1000)::bigint
UNION ALL
(SELECT 'row', seq, target, NULL, next_attempt_at
 FROM protean.outbox WHERE status = 'pending' AND seq NOT BETWEEN $2 AND $3
 ORDER BY seq LIMIT $1)
UNION ALL
SELECT 'lease', NULL, target, worker, until FROM protean.outbox_leases
