UPDATE protean_counters SET value = value + 1 WHERE name = 'document_version' RETURNING value
