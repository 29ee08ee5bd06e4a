INSERT INTO protean.positions (subscription, position) VALUES ($1, $2)
ON CONFLICT (subscription) DO UPDATE SET position = excluded.position, updated_at = now()
