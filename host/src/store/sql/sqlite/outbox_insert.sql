INSERT INTO outbox (global_position, target) VALUES (?1, ?2)
