-- The entry names the collection, so the field index alone answers (and the planner has no other
-- index to prefer).
SELECT id, data, version
FROM protean.documents
WHERE fields @> ARRAY[$1::text]
ORDER BY id
