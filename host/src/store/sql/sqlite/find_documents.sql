-- CROSS JOIN keeps the field index as the outer loop: an index lookup, not a scan of the collection.
SELECT d.id, d.data, d.version
FROM document_fields f
CROSS JOIN documents d
WHERE f.collection = ?1 AND f.field = ?2 AND f.value = ?3
  AND d.collection = f.collection AND d.id = f.id
ORDER BY f.id
