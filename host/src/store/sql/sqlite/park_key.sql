-- Parked (again): waiting behind this dead letter, not released.
INSERT INTO parked_keys (subscription, ordering_key, dead_letter, released, parked_at)
VALUES (?1, ?2, ?3, 0, ?4)
ON CONFLICT (subscription, ordering_key) DO UPDATE SET dead_letter = excluded.dead_letter, released = 0
