SELECT max(global_position) FROM message_store.messages WHERE message_store.category(stream_name) = $1
