INSERT OR IGNORE INTO document_fields (collection, field, value, id) VALUES (?1, ?2, ?3, ?4)
