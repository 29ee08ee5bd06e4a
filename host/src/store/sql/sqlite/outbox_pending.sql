SELECT o.seq, o.target, m.stream_name, m.type, o.attempts, o.last_error, o.next_attempt_at, m.time
FROM outbox o JOIN messages m ON m.global_position = o.global_position
WHERE o.status = 'pending' AND (?1 IS NULL OR o.target = ?1)
ORDER BY o.seq LIMIT ?2
