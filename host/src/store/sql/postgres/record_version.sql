INSERT INTO protean.schema_version (version, name) VALUES ($1, $2)
