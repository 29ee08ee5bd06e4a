SELECT o.seq, o.target, o.attempts,
       m.global_position, m.position, m.stream_name, m.type, coalesce(m.metadata #>> '{headers,id}', m.id::text),
       to_char(m.time, 'YYYY-MM-DD"T"HH24:MI:SS.US"+00:00"'), coalesce(m.data::text, '{}'), coalesce(m.metadata::text, '{}')
FROM protean.outbox o JOIN message_store.messages m ON m.global_position = o.global_position
WHERE o.seq = ANY($1::bigint[])
ORDER BY o.seq
