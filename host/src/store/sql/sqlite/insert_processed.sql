INSERT OR IGNORE INTO processed (subscription, message_id, build_id, processed_at) VALUES (?1, ?2, ?3, ?4)
