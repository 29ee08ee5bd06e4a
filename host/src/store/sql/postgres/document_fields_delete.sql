DELETE FROM protean.document_fields AS f
USING unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k (collection, field, value, id)
WHERE f.collection = k.collection AND f.field = k.field AND f.value = k.value AND f.id = k.id
