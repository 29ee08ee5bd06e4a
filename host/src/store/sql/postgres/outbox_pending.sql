SELECT o.seq, o.target, m.stream_name, m.type, o.attempts, o.last_error, o.next_attempt_at,
       (extract(epoch FROM m.time) * 1000)::bigint
FROM protean.outbox o JOIN message_store.messages m ON m.global_position = o.global_position
WHERE o.status = 'pending' AND ($1::text IS NULL OR o.target = $1)
ORDER BY o.seq LIMIT $2
