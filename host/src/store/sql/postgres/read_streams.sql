-- Several whole streams in one statement (a batch's reads ahead), each in order.
FROM message_store.messages WHERE stream_name = ANY($1) ORDER BY stream_name, position
