SELECT field, value FROM document_fields WHERE collection = ?1 AND id = ?2
