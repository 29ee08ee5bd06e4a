SELECT o.seq, o.target, o.next_attempt_at, o.attempts,
       m.global_position, m.position, m.stream_name, m.type, m.id, m.time, m.data, m.metadata
FROM outbox o LEFT JOIN messages m ON m.global_position = o.global_position
WHERE o.status = 'pending' ORDER BY o.seq LIMIT ?1
