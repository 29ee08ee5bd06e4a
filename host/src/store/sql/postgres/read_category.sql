-- One category: a range scan of messages_category from (category, $2), stopped by the limit.
-- The category is bounded on both sides (>= and <=, which for text is =) and the order is the index's
-- own, (category, global_position): with `category = $1 ... ORDER BY global_position` the planner may
-- take the primary key's order and filter by category instead, which at the head of a category that
-- has gone quiet reads every message appended to other categories since, at every poll.
FROM message_store.messages
WHERE message_store.category(stream_name) >= $1 AND message_store.category(stream_name) <= $1
  AND global_position > $2
ORDER BY message_store.category(stream_name), global_position
LIMIT $3
