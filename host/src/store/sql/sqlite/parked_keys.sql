SELECT p.ordering_key, p.dead_letter, p.released, (
    SELECT count(*) FROM held_messages h JOIN messages m ON m.global_position = h.global_position
    WHERE h.subscription = p.subscription AND h.ordering_key = p.ordering_key
)
FROM parked_keys p WHERE p.subscription = ?1 ORDER BY p.ordering_key
