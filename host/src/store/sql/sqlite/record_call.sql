INSERT INTO calls_in_flight (subscription, identity, attempts) VALUES (?1, ?2, ?3)
ON CONFLICT (subscription, identity) DO UPDATE SET attempts = excluded.attempts
