SELECT d.id, d.data
FROM document_fields f
JOIN documents d ON d.collection = f.collection AND d.id = f.id
WHERE f.collection = ?1 AND f.field = ?2 AND f.value = ?3
ORDER BY d.id
