-- An unconditional write (the handler did not read the document): whatever is stored is replaced.
INSERT INTO protean.documents (collection, id, data) VALUES ($1, $2, $3)
ON CONFLICT (collection, id) DO UPDATE SET data = excluded.data, version = nextval('protean.document_versions')
