-- A subscription's lag in one category: counted on messages_category, nothing read.
SELECT COUNT(*) FROM messages WHERE category = ?1 AND global_position > ?2
