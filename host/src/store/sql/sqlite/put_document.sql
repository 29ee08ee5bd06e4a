INSERT INTO documents (collection, id, data, version) VALUES (?1, ?2, ?3, ?4) ON CONFLICT (collection, id) DO UPDATE SET data = excluded.data, version = excluded.version
