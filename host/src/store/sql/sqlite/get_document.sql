SELECT data, version FROM documents WHERE collection = ?1 AND id = ?2
