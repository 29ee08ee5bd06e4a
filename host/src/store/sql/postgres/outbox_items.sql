SELECT o.seq, o.target, o.attempts, m.global_position, m.position,
       coalesce(m.data::text, '{}'), coalesce(m.metadata::text, '{}')
FROM protean.outbox o JOIN message_store.messages m ON m.global_position = o.global_position
WHERE o.seq = ANY($1::bigint[])
ORDER BY o.seq
