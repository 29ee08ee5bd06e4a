INSERT INTO outbox (global_position, target, checksum) VALUES (?1, ?2, ?3)
