SELECT o.seq, o.target, o.attempts,
       m.global_position, m.position, m.stream_name, m.type, m.id, m.time, m.data, m.metadata
FROM outbox o JOIN messages m ON m.global_position = o.global_position
WHERE o.seq = ?1
