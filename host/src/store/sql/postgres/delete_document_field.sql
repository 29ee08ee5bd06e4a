DELETE FROM protean.document_fields WHERE collection = $1 AND field = $2 AND value = $3 AND id = $4
