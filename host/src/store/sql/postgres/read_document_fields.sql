SELECT field, value FROM protean.document_fields WHERE collection = $1 AND id = $2
