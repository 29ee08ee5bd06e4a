SELECT data, version FROM protean.documents WHERE collection = $1 AND id = $2
