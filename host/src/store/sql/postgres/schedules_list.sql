WHERE $1::text IS NULL OR state = $1 ORDER BY due_ms, key LIMIT $2
