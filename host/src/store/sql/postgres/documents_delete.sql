DELETE FROM protean.documents AS d
USING unnest($1::text[], $2::text[]) AS k (collection, id)
WHERE d.collection = k.collection AND d.id = k.id
