-- New data for documents locked by documents_lock; each gets a new version.
UPDATE protean.documents AS d
SET data = k.data, fields = k.fields::text[], version = nextval('protean.document_versions')
FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k (collection, id, data, fields)
WHERE d.collection = k.collection AND d.id = k.id
