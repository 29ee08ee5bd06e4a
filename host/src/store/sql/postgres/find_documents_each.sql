-- Several finds in one statement (a batch's finds ahead): the documents of each field index entry of
-- $1, numbered by the entry's place there, each find's in id order as find_documents answers.
SELECT e.n, d.id, d.data, d.version
FROM unnest($1::text[]) WITH ORDINALITY AS e (entry, n)
CROSS JOIN LATERAL (
    SELECT id, data, version FROM protean.documents WHERE fields @> ARRAY[e.entry]
) AS d
ORDER BY e.n, d.id
