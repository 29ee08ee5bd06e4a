SELECT MAX(global_position) FROM messages
