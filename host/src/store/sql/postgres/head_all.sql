SELECT max(global_position) FROM message_store.messages
