-- Delete the version the handler read, or change nothing (a conflict).
DELETE FROM protean.documents WHERE collection = $1 AND id = $2 AND version = $3
