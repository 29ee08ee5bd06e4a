-- Several documents in one statement (a batch's reads ahead); absent ones return no row.
SELECT k.collection, d.id, d.data, d.version
FROM protean.documents AS d
JOIN unnest($1::text[], $2::text[]) AS k (collection, id)
    ON d.collection = k.collection AND d.id = k.id
