-- The stored versions of a unit's documents, their rows locked until the commit, in one order for
-- every unit (so two units writing the same documents cannot deadlock). Absent documents return no row.
SELECT d.collection, d.id, d.version
FROM protean.documents AS d
JOIN unnest($1::text[], $2::text[]) AS k (collection, id)
    ON d.collection = k.collection AND d.id = k.id
ORDER BY d.collection, d.id
FOR UPDATE OF d
