INSERT INTO protean.document_fields (collection, field, value, id) VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING
