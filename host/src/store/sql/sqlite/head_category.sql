SELECT MAX(global_position) FROM messages WHERE category = ?1
