DELETE FROM held_messages WHERE subscription = ?1 AND ordering_key = ?2 AND global_position = ?3
