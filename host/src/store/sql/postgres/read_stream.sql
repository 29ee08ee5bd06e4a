FROM message_store.messages WHERE stream_name = $1 AND position >= $2 ORDER BY position
