SELECT d.id, d.data, d.version
FROM protean.document_fields f
JOIN protean.documents d ON d.collection = f.collection AND d.id = f.id
WHERE f.collection = $1 AND f.field = $2 AND f.value = $3
ORDER BY f.id
