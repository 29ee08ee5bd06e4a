SELECT MAX(position) FROM messages WHERE stream_name = ?1
