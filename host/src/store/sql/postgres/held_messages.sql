FROM message_store.messages WHERE global_position IN (
    SELECT h.global_position FROM protean.held_messages h
    WHERE h.subscription = $1 AND h.ordering_key = $2
      AND EXISTS (SELECT 1 FROM message_store.messages m WHERE m.global_position = h.global_position)
    ORDER BY h.global_position LIMIT $3
) ORDER BY global_position
