INSERT INTO protean.documents (collection, id, data) VALUES ($1, $2, $3)
ON CONFLICT (collection, id) DO UPDATE SET data = excluded.data
