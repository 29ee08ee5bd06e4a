-- The indexed fields of a unit's documents, as stored (after its writes, so a concurrent insert's
-- fields are seen too).
SELECT f.collection, f.id, f.field, f.value
FROM protean.document_fields AS f
JOIN unnest($1::text[], $2::text[]) AS k (collection, id)
    ON f.collection = k.collection AND f.id = k.id
