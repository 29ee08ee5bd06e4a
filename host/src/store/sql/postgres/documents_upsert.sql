-- Documents that were absent, written unconditionally: one inserted meanwhile by another writer is
-- replaced (the statement waits for that writer's commit).
INSERT INTO protean.documents (collection, id, data, fields)
SELECT collection, id, data, fields::text[]
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k (collection, id, data, fields)
ON CONFLICT (collection, id) DO UPDATE
SET data = excluded.data, fields = excluded.fields, version = nextval('protean.document_versions')
