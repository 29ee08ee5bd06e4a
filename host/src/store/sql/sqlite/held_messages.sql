SELECT m.global_position, m.position, m.stream_name, m.type, m.id, m.time, m.data, m.metadata
FROM held_messages h JOIN messages m ON m.global_position = h.global_position
WHERE h.subscription = ?1 AND h.ordering_key = ?2
ORDER BY h.global_position LIMIT ?3
