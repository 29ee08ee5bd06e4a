-- Documents that a handler saw absent: inserted, or left alone when another writer inserted one
-- meanwhile (the statement waits for its commit); the caller reads a missing row as a conflict.
INSERT INTO protean.documents (collection, id, data, fields)
SELECT collection, id, data, fields::text[]
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k (collection, id, data, fields)
ON CONFLICT (collection, id) DO NOTHING
RETURNING collection, id
