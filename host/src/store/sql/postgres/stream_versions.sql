SELECT s, (SELECT max(m.position) FROM message_store.messages m WHERE m.stream_name = s)
FROM unnest($1::text[]) AS s
