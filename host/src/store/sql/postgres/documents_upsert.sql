-- Documents that were absent, written unconditionally: one inserted meanwhile by another writer is
-- replaced (the statement waits for that writer's commit).
INSERT INTO protean.documents (collection, id, data)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
ON CONFLICT (collection, id) DO UPDATE SET data = excluded.data, version = nextval('protean.document_versions')
