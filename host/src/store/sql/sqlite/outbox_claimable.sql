-- The oldest pending rows, up to ?1, passing over the rows ?2..=?3 (the longest run the worker has
-- in flight; an empty range when none), with what their messages' wire forms are made of.
SELECT o.seq, o.target, o.next_attempt_at, o.attempts,
       m.global_position, m.position, m.data, m.metadata, o.checksum
FROM outbox o LEFT JOIN messages m ON m.global_position = o.global_position
WHERE o.status = 'pending' AND o.seq NOT BETWEEN ?2 AND ?3 ORDER BY o.seq LIMIT ?1
