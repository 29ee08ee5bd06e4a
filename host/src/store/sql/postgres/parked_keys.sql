SELECT p.ordering_key, p.dead_letter, p.released, (
    SELECT count(*) FROM protean.held_messages h JOIN message_store.messages m USING (global_position)
    WHERE h.subscription = p.subscription AND h.ordering_key = p.ordering_key
)
FROM protean.parked_keys p WHERE p.subscription = $1 ORDER BY p.ordering_key
