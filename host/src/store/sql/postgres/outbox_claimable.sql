-- What an outbox claim judges, in one statement (so one round trip and one snapshot), as rows of
-- (kind, seq, target, worker, at): the database's clock ('clock', at = now in unix ms: leases are
-- judged by the one clock every replica shares), the oldest pending rows, up to $1 ('row', at = when
-- the row may next be tried), and every target's lease ('lease', at = when it ends).
SELECT 'clock', NULL::bigint, NULL::text, NULL::text,
       (extract(epoch FROM clock_timestamp()) * 1000)::bigint
UNION ALL
(SELECT 'row', seq, target, NULL, next_attempt_at
 FROM protean.outbox WHERE status = 'pending' ORDER BY seq LIMIT $1)
UNION ALL
SELECT 'lease', NULL, target, worker, until FROM protean.outbox_leases
