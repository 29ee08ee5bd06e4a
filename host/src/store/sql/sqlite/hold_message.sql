-- A re-read (a worker reading again from its position) holds a message twice: once is kept.
INSERT OR IGNORE INTO held_messages (subscription, ordering_key, global_position) VALUES (?1, ?2, ?3)
