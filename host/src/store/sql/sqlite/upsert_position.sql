INSERT INTO positions (subscription, position, updated_at) VALUES (?1, ?2, ?3) ON CONFLICT (subscription) DO UPDATE SET position = excluded.position, updated_at = excluded.updated_at
